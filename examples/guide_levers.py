"""Levers that cut the guide's share of a guided step, against their effect on accuracy on the
zoo: PPAP guidance (``fashion-ppap5``) on every DDIM-25 step, or only on a subset of the steps
(``GuidanceTerm.interval``). Each row: the same noises and targets (``--num`` samples, all
classes in turn), judged by ``fashion-evaluator``; the guide is called on the printed share of steps.

    python examples/guide_levers.py --num 200
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from ppap.batch_sampling import sample_images
from ppap.loading import load_experts, load_guide, load_pipeline
from ppap.metrics import accuracy

LEVERS = {  # name -> guidance interval [lo, hi) in training timesteps (None: every step)
    "every step": None,
    "not at t < 200 (the last 5 of 25 steps)": (200, 1000),
    "not at t >= 800 (the first 5 of 25 steps)": (0, 800),
    "only 200 <= t < 800 (15 of 25 steps)": (200, 800),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    pipe = load_pipeline("fashion-ddpm")
    guide = load_guide("fashion-classifier")
    bank = load_experts("fashion-ppap5", load_guide("fashion-classifier"), pipe.diffusion)
    judge = load_guide("fashion-evaluator")
    term = pipe.guidance_term(args.num, guide=guide, experts=bank, target="all", method="ppap")
    timesteps = pipe.diffusion.schedule.grid(25, "ddim").timesteps
    print("| guidance on | guided steps | judged the requested class | sampling seconds |")
    print("|---|---|---|---|")
    for name, interval in LEVERS.items():
        lo, hi = interval or (0, 1000)
        share = int(((timesteps >= lo) & (timesteps < hi)).sum())
        start = time.perf_counter()
        x = sample_images(
            pipe,
            args.num,
            seed=args.seed,
            terms=[dataclasses.replace(term, interval=interval)],
            progress=False,
            num_inference_steps=25,
            sampler="ddim",
        )
        seconds = time.perf_counter() - start
        judged = accuracy(judge, x, term.targets)
        print(f"| {name} | {share} of 25 | {judged:.1%} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
