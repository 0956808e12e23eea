"""``ppap zoo train NAME``: rebuild a zoo model from its recorded recipe (resumable)."""

from __future__ import annotations

from pathlib import Path

from . import zoo
from .io import PPAPError

DEFAULT_OUT = Path("runs/zoo-models")  # relative to the working directory, like every other run


def train_zoo_model(name: str, work_root: Path, data_dir=None, out_root: Path | None = DEFAULT_OUT) -> dict:
    """Train zoo model ``name`` with its recipe: checkpoints under ``work_root / name``, the model
    at ``out_root / <its zoo path>`` (the package's own layout, so ``--diffusion
    runs/zoo-models/fashion-ddpm`` loads it). ``out_root=None`` replaces the model shipped inside
    the package (a maintainer's step). Recipes that build on other zoo models (the experts) read
    those from the package."""
    from . import recipes, recipes_rgb

    if name not in zoo.ZOO:
        raise PPAPError(f"unknown zoo model {name!r}; valid: {', '.join(zoo.ZOO)}")
    entry = zoo.ZOO[name]
    work = Path(work_root) / name
    out = entry.location if out_root is None else Path(out_root) / entry.path
    if name == "fashion-ddpm":
        card = recipes.train_ddpm(out, work, data_dir=data_dir)
    elif name == "fashion-rgb-ddpm":
        card = recipes_rgb.train_rgb_ddpm(out, work, data_dir=data_dir)
    elif name in recipes_rgb.RGB_GUIDE_RECIPES:
        card = recipes_rgb.train_rgb_guide(name, out, work, data_dir=data_dir)
    elif name in recipes.CLASSIFIER_RECIPES:
        card = recipes.train_classifier(name, out, work, data_dir=data_dir)
    elif name in recipes.EXPERT_RECIPES:
        card = recipes.train_zoo_experts(name, out, work)
    else:  # a zoo entry without a recipe is a bug, not a user error
        raise AssertionError(f"no recipe for zoo model {name}")
    print({k: v for k, v in card.items() if k != "recipe"})
    print(f"wrote {out}")
    return card
