"""Per-step cost of guidance with the zoo's default models, side by side in one run: one
mid-noise DDIM step at batch B for each method (timed round-robin, median of R), as a ratio to
an unguided step. `ppap bench classifier` measures the same for every row of its table.

    python benchmarks/step_cost.py --batch 64 --repeats 10
"""

from __future__ import annotations

import argparse
import json

import torch

from ppap.bench import time_steps
from ppap.pipeline import guide_builder, load_bank, load_diffusion, load_guide, task_for


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    diffusion = load_diffusion("fashion-ddpm")
    naive = load_guide("fashion-classifier")
    task = task_for(naive, diffusion.image_shape)
    bank, _ = load_bank("fashion-ppap5", load_guide("fashion-classifier"), diffusion)
    targets = torch.arange(args.batch) % task.num_classes
    guides = {m: guide_builder(m, task=task, scale=1.0, guide=naive, experts=bank, diffusion=diffusion)(targets)
              for m in ("unguided", "naive", "ppap", "x0", "x0-shortcut")}
    seconds = time_steps(diffusion, guides, args.batch, steps=25, repeats=args.repeats)
    for method, sec in seconds.items():
        print(json.dumps({"method": method, "batch": args.batch, "seconds_per_step": round(sec, 4),
                          "ratio_to_unguided": round(sec / seconds["unguided"], 2)}))


if __name__ == "__main__":
    main()
