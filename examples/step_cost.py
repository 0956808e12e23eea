"""Per-step cost of guidance with the zoo's default models, side by side in one run: one
mid-noise DDIM step at batch B for each method (timed round-robin, median of R), as a ratio to
an unguided step. `ppap bench classifier` measures the same for every row of its table.
``--whole``: whole DDIM-25 trajectories instead, per step, so that PPAP's expert switches (a
merge and an unmerge each) are in its time. ``--guide-only``: only the guide's call (the part
of a step that differs between the methods whose UNet forward needs no grad; x0 is left out), so
that a few percent are not lost in the UNet forward's noise.

    python examples/step_cost.py --batch 64 --repeats 10
    python examples/step_cost.py --batch 16 --repeats 5 --whole
    python examples/step_cost.py --batch 64 --repeats 100 --guide-only
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json

import torch

from ppap.bench.common import mid_step, round_robin_median, time_steps
from ppap.loading import load_experts, load_guide, load_pipeline


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--whole", action="store_true", help="time whole trajectories (with the expert switches), per step")
    p.add_argument("--guide-only", action="store_true", help="time only the guides' calls at the mid-noise step")
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
    if args.guide_only:
        guides = {k: g for k, g in guides.items() if g is not None and not hasattr(g, "guided_prediction")}
        seconds = time_guide_calls(diffusion, guides, args.batch, args.repeats)
    else:
        seconds = time_steps(diffusion, guides, args.batch, steps=25, repeats=args.repeats, whole=args.whole)
    for method, sec in seconds.items():
        print(
            json.dumps(
                {
                    "method": method,
                    "batch": args.batch,
                    "timed": "guide call" if args.guide_only else "whole DDIM-25 trajectory, per step" if args.whole else "mid-noise step",
                    "seconds_per_step": round(sec, 4),
                    **({} if args.guide_only else {"ratio_to_unguided": round(sec / seconds["unguided"], 3)}),
                    "ratio_to_naive": round(sec / seconds["naive"], 3),
                }
            )
        )
    print(json.dumps({"expert switch (unmerge, set_adapter, merge) ms": round(1000 * time_switch(bank), 1)}))


def time_switch(bank, repeats: int = 40) -> float:
    """Median seconds of one expert switch of a merged bank (what the router pays when t crosses a
    boundary: a trajectory pays it once per expert)."""
    bank.eval()
    nexts = itertools.cycle(range(bank.router.num_experts))
    return round_robin_median({"switch": lambda: bank.activate(next(nexts))}, repeats)["switch"]  # no forward


def time_guide_calls(diffusion, guides: dict, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of each guide's call at the mid-noise step of DDIM-25 on one batch (the
    UNet's prediction computed once), round-robin; round 0 warms up and is dropped."""
    x = torch.randn((batch,) + diffusion.image_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), int(mid_step(diffusion, 25).timesteps[0]))
    with torch.no_grad():
        pred = diffusion(x, t)

    def call(guide):
        with torch.enable_grad():
            guide(x, t, pred)

    return round_robin_median({name: functools.partial(call, guide) for name, guide in guides.items()}, repeats)


if __name__ == "__main__":
    main()
