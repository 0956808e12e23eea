"""Tasks: what a guidance model's output means, independent of diffusion and of experts.

A task turns
  * (model output, target)            -> per-sample log-likelihood [B] (guided sampling),
  * (student output, teacher output)  -> per-sample distillation loss [B] (data-free experts),
  * (model output, label)             -> per-sample supervised loss [B] (labelled baselines).
Samplers and the trainer only see these three functions, so a new task needs no change there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .io import PPAPError


class Task(Protocol):
    @property
    def name(self) -> str: ...

    def check_target(self, target: Tensor, output_shape: tuple[int, ...]) -> Tensor:
        """Validate ``target`` against a model output of ``output_shape`` ([B, ...]); return it
        in the dtype ``log_likelihood`` expects, or raise PPAPError naming the bad value."""

    def log_likelihood(self, output: Tensor, target: Tensor) -> Tensor: ...

    def distill_loss(self, student: Tensor, teacher: Tensor) -> Tensor: ...

    def supervised_loss(self, output: Tensor, label: Tensor) -> Tensor: ...

    def target_from_output(self, output: Tensor) -> Tensor:
        """The target a clean reference image implies (argmax class, label map, dense map)."""


@dataclass(frozen=True)
class Classification:
    """Class-conditional guidance with a classifier emitting logits [B, K].

    KD as in PPAP's official code: KL(softmax(teacher / tau) || softmax(student)), with the
    temperature on the teacher only (tau < 1 sharpens it). Unlike that code we sum over classes
    (a true per-sample KL) instead of averaging, so the loss scale does not depend on K, and the
    default is the teacher's own softmax (tau 1), not its 4x sharpened one (tau 0.25): higher
    guided accuracy, on the worst class too, at the same FID (docs/findings.md, "Teacher temperature").
    """

    num_classes: int
    tau: float = 1.0
    name: str = "classification"

    def check_target(self, target: Tensor, output_shape: tuple[int, ...]) -> Tensor:
        if len(output_shape) != 2 or output_shape[1] != self.num_classes:
            raise PPAPError(f"classification needs model output [B, {self.num_classes}], the model gives {list(output_shape)}")
        target = torch.as_tensor(target)
        if target.is_floating_point() or target.ndim != 1:
            raise PPAPError(f"a class target is one integer per sample, got {target.dtype} of shape {list(target.shape)}")
        bad = target[(target < 0) | (target >= self.num_classes)]
        if bad.numel():
            raise PPAPError(
                f"class index {int(bad[0])} is out of range: the model has {self.num_classes} classes (0..{self.num_classes - 1})"
            )
        return target.long()

    def log_likelihood(self, output: Tensor, target: Tensor) -> Tensor:
        return output.log_softmax(-1).gather(-1, target[:, None].to(output.device)).squeeze(-1)

    def distill_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        p_teacher = (teacher / self.tau).softmax(-1)
        return F.kl_div(student.log_softmax(-1), p_teacher, reduction="none").sum(-1)

    def supervised_loss(self, output: Tensor, label: Tensor) -> Tensor:
        return F.cross_entropy(output, label, reduction="none")

    def target_from_output(self, output: Tensor) -> Tensor:
        return output.argmax(-1)


@dataclass(frozen=True)
class Segmentation:
    """Layout guidance with a segmentation net emitting per-pixel logits [B, K, H, W]; the target
    is a label map [B, H, W] of ints in [0, K).

    The log-likelihood is minus the per-pixel cross-entropy *averaged* over pixels, so a guidance
    scale means the same at any resolution (summing would multiply the useful scale by H*W).
    KD is the per-pixel KL to the teacher's tempered softmax, averaged over pixels.
    """

    num_classes: int
    tau: float = 1.0
    name: str = "segmentation"

    def check_target(self, target: Tensor, output_shape: tuple[int, ...]) -> Tensor:
        if len(output_shape) != 4 or output_shape[1] != self.num_classes:
            raise PPAPError(f"segmentation needs model output [B, {self.num_classes}, H, W], the model gives {list(output_shape)}")
        target = torch.as_tensor(target)
        if target.is_floating_point() or target.ndim != 3 or tuple(target.shape[1:]) != tuple(output_shape[2:]):
            raise PPAPError(
                f"a segmentation target is an integer label map [B, {output_shape[2]}, {output_shape[3]}], "
                f"got {target.dtype} of shape {list(target.shape)}"
            )
        bad = target[(target < 0) | (target >= self.num_classes)]
        if bad.numel():
            raise PPAPError(f"label {int(bad[0])} in the target map is out of range: the model has {self.num_classes} classes")
        return target.long()

    def log_likelihood(self, output: Tensor, target: Tensor) -> Tensor:
        return -F.cross_entropy(output, target.to(output.device), reduction="none").mean((1, 2))

    def distill_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        p_teacher = (teacher / self.tau).softmax(1)
        return F.kl_div(student.log_softmax(1), p_teacher, reduction="none").sum(1).mean((1, 2))

    def supervised_loss(self, output: Tensor, label: Tensor) -> Tensor:
        return F.cross_entropy(output, label, reduction="none").mean((1, 2))

    def target_from_output(self, output: Tensor) -> Tensor:
        return output.argmax(1)


@dataclass(frozen=True)
class DenseRegression:
    """Guidance toward a dense map (depth-like) from a net emitting [B, C, H, W]; the target map
    has the same shape. log-likelihood = -mean |output - target|^p (p = 1 or 2, mean over
    pixels, the scale-independent choice as for segmentation); KD uses the same distance to the
    teacher's map on the clean image. ``tau`` is unused (kept so every task has one signature)."""

    distance: str = "l1"  # "l1" or "l2"
    tau: float = 1.0
    name: str = "dense"

    def __post_init__(self):
        if self.distance not in ("l1", "l2"):
            raise PPAPError(f"unknown distance {self.distance!r}; valid: 'l1', 'l2'")

    def _dist(self, a: Tensor, b: Tensor) -> Tensor:
        d = (a - b).abs() if self.distance == "l1" else (a - b).square()
        return d.flatten(1).mean(1)

    def check_target(self, target: Tensor, output_shape: tuple[int, ...]) -> Tensor:
        target = torch.as_tensor(target)
        if len(output_shape) != 4:
            raise PPAPError(f"dense guidance needs model output [B, C, H, W], the model gives {list(output_shape)}")
        if not target.is_floating_point() or tuple(target.shape[1:]) != tuple(output_shape[1:]):
            raise PPAPError(
                f"a dense target map must be float [B, {', '.join(map(str, output_shape[1:]))}] like the model output, "
                f"got {target.dtype} of shape {list(target.shape)}"
            )
        return target.float()

    def log_likelihood(self, output: Tensor, target: Tensor) -> Tensor:
        return -self._dist(output, target.to(output.device))

    def distill_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return self._dist(student, teacher)

    def supervised_loss(self, output: Tensor, label: Tensor) -> Tensor:
        return self._dist(output, label)

    def target_from_output(self, output: Tensor) -> Tensor:
        return output


TASKS = {"classification": Classification, "segmentation": Segmentation, "dense": DenseRegression}


def make_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise PPAPError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


def output_shape(net, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape of ``net`` on a batch of 2 blank images of the diffusion model's shape; a
    net that cannot take them fails here with one line instead of deep inside the sampler."""
    params = list(net.parameters()) if hasattr(net, "parameters") else []
    device = params[0].device if params else torch.device("cpu")
    try:
        with torch.no_grad():
            out = net(torch.zeros((2,) + tuple(image_shape), device=device))
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise PPAPError(
            f"{getattr(net, 'ref', 'the guidance model')} cannot take images of shape {list(image_shape)} from the diffusion model ({msg})"
        ) from None
    if not isinstance(out, Tensor):
        raise PPAPError(f"the guidance model returns {type(out).__name__}, not a tensor: wrap it in ppap.GuideModel(..., output=...)")
    return tuple(out.shape)


def task_for(net, image_shape: tuple[int, ...], name: str = "classification", **kwargs) -> Task:
    """The task for a guidance model, with its size (the class count) read off its output.
    ``tau=None`` keeps the task's own default temperature."""
    if kwargs.get("tau", 0) is None:
        kwargs.pop("tau")
    shape = output_shape(net, image_shape)
    ref = getattr(net, "ref", "the guidance model")
    if name == "classification":
        if len(shape) != 2:
            raise PPAPError(f"{ref} gives output of shape {list(shape[1:])} per image, not class logits")
        kwargs.setdefault("num_classes", shape[1])
    elif name == "segmentation":
        if len(shape) != 4:
            raise PPAPError(f"{ref} gives output of shape {list(shape[1:])} per image, not per-pixel logits [K, H, W]")
        kwargs.setdefault("num_classes", shape[1])
    return make_task(name, **kwargs)


# --------------------------------------------------------------------------------------------
# Targets: what the user asks for, per sample
# --------------------------------------------------------------------------------------------


def class_targets(spec, num: int, num_classes: int, classes: tuple[str, ...] | None = None) -> Tensor:
    """[num] int64 class targets, cycled: an index, a class name, ``'all'`` (0..K-1), a comma
    list of these (``'0,7,ankle boot'``), a sequence, or a tensor of indices."""
    names = {c.lower(): i for i, c in enumerate(classes or ())}

    def one(part) -> int:
        if isinstance(part, (int, torch.Tensor)) and not isinstance(part, bool):
            return int(part)
        text = str(part).strip().lower()
        if text.lstrip("-").isdigit():
            return int(text)
        if text in names:
            return names[text]
        valid = f" or one of: {', '.join(classes)}" if classes else ""
        raise PPAPError(f"bad class target {part!r}: use an index 0..{num_classes - 1}{valid}")

    if isinstance(spec, str):
        values = list(range(num_classes)) if spec.strip().lower() == "all" else [one(p) for p in spec.split(",")]
    elif isinstance(spec, torch.Tensor):
        if spec.is_floating_point():
            raise PPAPError(f"class targets are integers, got a {spec.dtype} tensor")
        values = spec.reshape(-1).tolist()
    elif isinstance(spec, (list, tuple)):
        values = [one(p) for p in spec]
    else:
        values = [one(spec)]
    if not values:
        raise PPAPError("no class target given")
    for v in values:
        if not 0 <= v < num_classes:
            raise PPAPError(f"class index {v} is out of range: the guidance model has {num_classes} classes (0..{num_classes - 1})")
    return torch.tensor([values[k % len(values)] for k in range(num)], dtype=torch.long)


def dense_targets(
    task: Task, net, num: int, out_shape: tuple[int, ...], *, image: Tensor | None = None, target_map: Tensor | None = None
) -> Tensor:
    """[num, ...] targets for a segmentation or dense task, cycled: the clean off-the-shelf
    model's output on reference images ``image`` ([C, H, W] or [N, C, H, W] in [-1, 1], at the
    diffusion model's size; the paper's use of DeepLabV3 / MiDaS), or a given ``target_map``
    ([H, W] labels or [C, H, W] map, or a stack [N, ...]). ``out_shape`` is the model's output
    shape for one batch, [B, ...]; every target is checked against it."""
    if (image is None) == (target_map is None):
        raise PPAPError(f"a {task.name} guide needs exactly one of --target-image or --target-map (a reference image or a map)")
    if image is not None:
        image = image[None] if image.ndim == 3 else image
        with torch.no_grad():
            maps = task.target_from_output(net(image)).cpu()
    else:
        maps = torch.as_tensor(target_map)
        per_sample = 2 if task.name == "segmentation" else 3  # [H, W] label map / [C, H, W] dense map
        if task.name == "dense" and maps.ndim == 2 and out_shape[1] == 1:
            maps = maps[None]  # an [H, W] map for a one-channel model
        maps = maps[None] if maps.ndim == per_sample else maps
        if task.name == "segmentation" and maps.is_floating_point() and bool((maps == maps.round()).all()):
            maps = maps.long()  # integer labels stored as floats
        if task.name == "dense" and not maps.is_floating_point():
            maps = maps.float()
    maps = task.check_target(maps, (len(maps),) + tuple(out_shape[1:]))
    return maps[torch.arange(num) % len(maps)]
