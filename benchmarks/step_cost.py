"""Per-step cost of guidance, side by side in one run: one DDIM step at batch B for each method,
median of R repeats, as a ratio to the unguided step.

    python benchmarks/step_cost.py --batch 64 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ppap.pipeline import guide_builder, load_bank, load_diffusion, load_guide, task_for
from ppap.samplers import sample_ddim


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    diffusion = load_diffusion("fashion-ddpm")
    naive = load_guide("fashion-classifier")
    task = task_for(naive, diffusion.image_shape)
    bank, _ = load_bank("fashion-ppap5", load_guide("fashion-classifier"), diffusion)
    targets = torch.arange(args.batch) % 10
    x = torch.randn(args.batch, *diffusion.image_shape, generator=torch.Generator().manual_seed(0))
    steps = diffusion.schedule.timesteps(25)[10:12]  # one step at t=560 (expert 2), then the next t
    rows = {}
    for method in ("unguided", "naive", "ppap", "x0"):
        guide = guide_builder(method, task=task, scale=1.0, guide=naive, experts=bank, diffusion=diffusion)(targets)
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            sample_ddim(diffusion, x, steps[:1], guide=guide)
            times.append(time.perf_counter() - t0)
        rows[method] = statistics.median(times[1:])  # the first call warms up
    base = rows["unguided"]
    for method, sec in rows.items():
        print(json.dumps({"method": method, "batch": args.batch, "seconds_per_step": round(sec, 4), "ratio_to_unguided": round(sec / base, 2)}))


if __name__ == "__main__":
    main()
