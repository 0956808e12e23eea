"""``ppap zoo train NAME``: rebuild a zoo model from its recorded recipe (resumable)."""

from __future__ import annotations

from pathlib import Path

from . import zoo
from .io import PPAPError

DEFAULT_OUT = Path("runs/zoo-models")  # relative to the working directory, like every other run


DIFFUSION_MODELS = ("fashion-ddpm", "fashion-rgb-ddpm")  # the recipes that run on any device


def train_zoo_model(
    name: str,
    work_root: Path,
    data_dir=None,
    out_root: Path | None = DEFAULT_OUT,
    device: str = "cpu",
    stop_after: int | None = None,
) -> dict:
    """Train zoo model ``name`` with its recipe: checkpoints under ``work_root / name``, the model
    at ``out_root / <its zoo path>`` (the package's own layout, so ``--diffusion
    runs/zoo-models/fashion-ddpm`` loads it). ``out_root=None`` replaces the model shipped inside
    the package (a maintainer's step). Recipes that build on other zoo models (the experts) read
    those from the package.

    ``device`` (the diffusion models only) is where the arithmetic runs; the draws stay on the CPU,
    so a run may move between machines through its checkpoint. ``stop_after`` ends this run after
    that many optimiser steps, checkpointed (the diffusion models only: time-sliced runs)."""
    from . import recipes, recipes_rgb
    from .loading import resolve_device

    if name not in zoo.ZOO:
        raise PPAPError(f"unknown zoo model {name!r}; valid: {', '.join(zoo.ZOO)}")
    if name not in DIFFUSION_MODELS and (device != "cpu" or stop_after is not None):
        raise PPAPError(f"--device and --stop-after apply to {' and '.join(DIFFUSION_MODELS)} only, not {name!r}")
    if stop_after is not None and stop_after < 1:
        raise PPAPError(f"--stop-after must be a positive number of steps, got {stop_after}")
    torch_device = resolve_device(device)
    entry = zoo.ZOO[name]
    work = Path(work_root) / name
    out = entry.location if out_root is None else Path(out_root) / entry.path
    if name == "fashion-ddpm":
        card = recipes.train_ddpm(out, work, data_dir=data_dir, stop_after=stop_after, device=torch_device)
    elif name == "fashion-rgb-ddpm":
        card = recipes_rgb.train_rgb_ddpm(out, work, data_dir=data_dir, stop_after=stop_after, device=torch_device)
    elif name in recipes_rgb.RGB_GUIDE_RECIPES:
        card = recipes_rgb.train_rgb_guide(name, out, work, data_dir=data_dir)
    elif name in recipes.CLASSIFIER_RECIPES:
        card = recipes.train_classifier(name, out, work, data_dir=data_dir)
    elif name in recipes.EXPERT_RECIPES:
        card = recipes.train_zoo_experts(name, out, work)
    else:  # a zoo entry without a recipe is a bug, not a user error
        raise AssertionError(f"no recipe for zoo model {name}")
    print({k: v for k, v in card.items() if k != "recipe"})
    if card.get("done", True):
        print(f"wrote {out}")
    return card
