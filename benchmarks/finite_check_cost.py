"""The cost of the per-step finiteness checks (issue #14): one mid-noise DDIM step at batch B,
unguided and PPAP-guided, with the checks on and off, timed round-robin in one process.

    python benchmarks/finite_check_cost.py --batch 64 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import functools
import json

import torch

import ppap.samplers as samplers
from ppap.bench.common import mid_step, round_robin_median
from ppap.loading import load_experts, load_guide, load_pipeline


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    pipe = load_pipeline("fashion-ddpm", device="cpu")
    diffusion = pipe.diffusion
    guide = load_guide("fashion-classifier")
    bank = load_experts("fashion-ppap5", copy.deepcopy(guide), diffusion)
    term = pipe.guidance_term(args.batch, guide=guide, experts=bank, target="all", classifier_scale=1.0)
    guides = {"unguided": None, "ppap": term.build(diffusion)}
    x = torch.randn((args.batch,) + diffusion.image_shape, generator=torch.Generator().manual_seed(0))
    step = mid_step(diffusion, 25)
    checks, skip = samplers._check_finite, lambda x, t: None

    def step_with(fn, check):
        samplers._check_finite = check  # the sample's check; the gradient's is one more reduction
        samplers.sample_ddim(diffusion, x, step, guidance=fn)

    calls = {
        f"{g} {c}": functools.partial(step_with, fn, check)
        for g, fn in guides.items()
        for c, check in (("checks on", checks), ("checks off", skip))
    }
    try:
        med = round_robin_median(calls, args.repeats)
    finally:
        samplers._check_finite = checks
    for g in guides:
        on, off = med[f"{g} checks on"], med[f"{g} checks off"]
        print(
            json.dumps(
                {
                    "step": g,
                    "batch": args.batch,
                    "seconds_checks_on": round(on, 4),
                    "seconds_checks_off": round(off, 4),
                    "ratio": round(on / off, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
