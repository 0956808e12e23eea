"""``ppap zoo train NAME``: rebuild a zoo model from its recorded recipe (resumable)."""

from __future__ import annotations

from pathlib import Path

from . import zoo
from .io import PPAPError


def train_zoo_model(name: str, work_root: Path, data_dir=None) -> dict:
    from . import recipes

    if name not in zoo.ZOO:
        raise PPAPError(f"unknown zoo model {name!r}; valid: {', '.join(zoo.ZOO)}")
    entry = zoo.ZOO[name]
    work = Path(work_root) / name
    if name == "fashion-ddpm":
        card = recipes.train_ddpm(entry.location, work, data_dir=data_dir)
    elif name in recipes.CLASSIFIER_RECIPES:
        card = recipes.train_classifier(name, entry.location, work, data_dir=data_dir)
    elif name in recipes.EXPERT_RECIPES:
        card = recipes.train_zoo_experts(name, entry.location, work)
    else:  # a zoo entry without a recipe is a bug, not a user error
        raise AssertionError(f"no recipe for zoo model {name}")
    print({k: v for k, v in card.items() if k != "recipe"})
    return card
