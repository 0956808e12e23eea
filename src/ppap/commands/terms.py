"""Guidance terms named in text: ``ppap sample --term 'guide=...,experts=...,scale=...'`` and the
web page's extra terms, parsed and loaded into the pipeline's guidance terms."""

from __future__ import annotations

from ..errors import PPAPError
from .common import finite_number

TERM_KEYS = ("guide", "guide_weights", "experts", "method", "task", "target", "target_image", "target_map", "scale", "calibration")


def parse_term(spec: str) -> dict[str, str]:
    """``'guide=fashion-classifier,experts=fashion-ppap5,target=ankle boot,scale=30'`` -> dict."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in TERM_KEYS:
            raise PPAPError(f"bad guidance term part {part!r}; use key=value with keys: {', '.join(sorted(TERM_KEYS))}")
        out[key] = value.strip()
    if "guide" not in out:
        raise PPAPError(f"guidance term {spec!r} has no guide=...")
    return out


def build_term(
    pipe,
    num: int,
    *,
    guide: str,
    guide_weights: str | None = None,
    experts: str | None = None,
    method: str = "ppap",
    task: str | None = None,
    target: str | None = None,
    target_image: str | None = None,
    target_map: str | None = None,
    scale=None,
    calibration: str = "",
    fit: str = "resize",
    revision: str | None = None,
):
    """Load what one guidance term names and resolve its ``num`` targets (``revision``: of the
    hub ids that name none of their own)."""
    import copy

    from ..guidance import Calibration
    from ..images import load_reference_image, load_target_map
    from ..loading import load_experts, load_guide

    if target_image is not None and target_map is not None:
        raise PPAPError("give --target-image or --target-map, not both")
    model = load_guide(guide, guide_weights, task=task, revision=revision).to(pipe._execution_device)  # ours: it runs where the sample is
    bank = load_experts(experts, copy.deepcopy(model), pipe.diffusion, revision=revision) if experts else None
    image = load_reference_image(target_image, pipe.image_shape, fit) if target_image else None
    target_value = load_target_map(target_map) if target_map else target
    return pipe.guidance_term(
        num,
        guide=model,
        experts=bank,
        target=target_value,
        target_image=image,
        method=method,
        classifier_scale=finite_number(scale, "guidance scale"),
        calibration=Calibration.parse(calibration),
        task=task,
    )
