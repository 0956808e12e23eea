"""Per-step cost of guidance with the zoo's default models, side by side in one run: one
mid-noise DDIM step at batch B for each method (timed round-robin, median of R), as a ratio to
an unguided step. `ppap bench classifier` measures the same for every row of its table.

    python benchmarks/step_cost.py --batch 64 --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import json

from ppap.bench.common import time_steps
from ppap.loading import load_experts, load_guide, load_pipeline


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    pipe = load_pipeline("fashion-ddpm", device="cpu")
    diffusion = pipe.diffusion
    naive = load_guide("fashion-classifier")
    bank = load_experts("fashion-ppap5", copy.deepcopy(naive), diffusion)
    unmerged = load_experts("fashion-ppap5", copy.deepcopy(naive), diffusion)
    unmerged.merge = False  # LoRA as separate branches, as during training
    guides = {}
    for name, m, experts in (
        ("unguided", "unguided", bank),
        ("naive", "naive", bank),
        ("ppap", "ppap", bank),
        ("ppap (unmerged LoRA)", "ppap", unmerged),
        ("x0", "x0", bank),
        ("x0-shortcut", "x0-shortcut", bank),
    ):
        term = pipe.guidance_term(args.batch, guide=naive, experts=experts, target="all", method=m, classifier_scale=1.0)
        guides[name] = term.build(diffusion) if term is not None else None  # targets: the classes cycled over the batch
    seconds = time_steps(diffusion, guides, args.batch, steps=25, repeats=args.repeats)
    for method, sec in seconds.items():
        print(
            json.dumps(
                {
                    "method": method,
                    "batch": args.batch,
                    "seconds_per_step": round(sec, 4),
                    "ratio_to_unguided": round(sec / seconds["unguided"], 3),
                    "ratio_to_naive": round(sec / seconds["naive"], 3),
                }
            )
        )


if __name__ == "__main__":
    main()
