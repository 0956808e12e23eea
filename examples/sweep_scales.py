"""Guidance-scale sweep on a seed set disjoint from the demo's: evaluator accuracy on the target
class per (method, scale). Writes JSON lines; used to pick the demo's scales (docs/results.md).

    python examples/sweep_scales.py --experts fashion-ppap5 --per-class 10 --out runs/sweep.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from ppap.batch_sampling import sample_images
from ppap.loading import load_experts, load_guide, load_pipeline


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", default="fashion-ppap5")
    p.add_argument("--methods", default="naive,ppap")
    p.add_argument("--scales", default="0.5,1,2,4,8")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=1000)  # the demo uses seed 1; keep the sets apart
    p.add_argument("--out", default="runs/sweep.jsonl")
    args = p.parse_args()

    pipe = load_pipeline("fashion-ddpm", device="cpu")
    evaluator = load_guide("fashion-evaluator").net
    naive = load_guide("fashion-classifier")
    bank = load_experts(args.experts, copy.deepcopy(naive), pipe.diffusion)
    targets = torch.arange(10).repeat_interleave(args.per_class)
    with open(args.out, "a") as f:
        for method in args.methods.split(","):
            for scale in map(float, args.scales.split(",")):
                term = pipe.guidance_term(len(targets), guide=naive, experts=bank, target=targets, method=method, classifier_scale=scale)
                t0 = time.time()
                x = sample_images(
                    pipe,
                    len(targets),
                    seed=args.seed,
                    terms=[term] if term is not None else [],
                    batch_size=50,
                    progress=False,
                    num_inference_steps=args.steps,
                    sampler="ddim",
                )
                with torch.no_grad():
                    acc = (evaluator(x).argmax(-1) == targets).float().mean().item()
                row = {
                    "method": method,
                    "scale": scale,
                    "accuracy": acc,
                    "n": len(targets),
                    "seconds": round(time.time() - t0, 1),
                    "experts": args.experts,
                }
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
