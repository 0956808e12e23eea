"""Unguided ppap sampling against diffusers' own loop, per scheduler and prediction type: the
max abs difference of the final samples (a tiny random UNet, 8x8, T = 1000, 10 steps, 4 samples,
the same x_T and generator). Prints a markdown table for docs/results.md.

    PYTHONPATH=src:tests python benchmarks/scheduler_parity.py
"""

from __future__ import annotations

import diffusers
import torch
from test_schedulers import _diffusers_loop as diffusers_loop  # the tests' reference loop

from ppap import Diffusion, NoiseSchedule
from ppap.schedulers import SAMPLER_NAMES, sample

from conftest import tiny_unet


def main() -> None:
    steps = 10
    print("| sampler | scheduler | epsilon | v_prediction |")
    print("|---|---|---|---|")
    for name, (class_name, overrides) in SAMPLER_NAMES.items():
        diffs = []
        for kind in ("epsilon", "v_prediction"):
            scheduler = getattr(diffusers, class_name)(num_train_timesteps=1000, prediction_type=kind, **overrides)
            unet = tiny_unet()
            diffusion = Diffusion(unet, NoiseSchedule.from_diffusers(scheduler))
            x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
            ref = diffusers_loop(unet, scheduler, x_T, steps, torch.Generator().manual_seed(1))
            ours = sample(diffusion, x_T, scheduler, steps, generator=torch.Generator().manual_seed(1))
            diffs.append((ours - ref).abs().max().item())
        print(f"| `{name}` | `{class_name}` | " + " | ".join("0 (bit-identical)" if d == 0 else f"{d:.1e}" for d in diffs) + " |")


if __name__ == "__main__":
    main()
