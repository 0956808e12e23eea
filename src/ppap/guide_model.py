"""An off-the-shelf vision model wrapped for differentiable use on diffusion images.

Off-the-shelf models (transformers, timm, torchvision) are trained on clean photographs that their
image processor turned into a normalised tensor: 8-bit pixels rescaled to [0, 1], resized, then
``(x01 - mean) / std``. A diffusion model's images ``x`` are in [-1, 1] at its own size and channel
count. :class:`GuideModel` redoes the processor's work on ``x`` in torch, differentiably (no PIL, no
numpy, no ``.detach``), so a guidance gradient flows from the net's output back to ``x``.

The step that public guidance repositories most often get wrong is the shift: ``mean`` and
``std`` are given in [0, 1] pixel units, so ``x`` must first become ``x01 = (x + 1) / 2``.
Applying ``(x - mean) / std`` to ``x`` in [-1, 1] feeds the net images that are too dark and too
contrasted. Here both steps are folded into one affine map, ``x * 0.5 / std + (0.5 - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .frozen import frozen
from .io import PPAPError
from .tasks import TASKS

RESIZE_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what PIL's convert("L") uses
# PIL resample ids (image processors store these) -> torch modes. PIL's NEAREST samples pixel
# centres, which is torch's "nearest-exact"; LANCZOS (1) and HAMMING (5) have no torch kernel, so
# they get the nearest one in shape.
PIL_RESAMPLE = {0: "nearest-exact", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "area", 5: "bilinear"}
OUTPUT_FOR_TASK = {"classification": "logits", "segmentation": "logits", "dense": "predicted_depth"}
TASK_SUFFIX = {"ForImageClassification": "classification", "ForSemanticSegmentation": "segmentation", "ForDepthEstimation": "dense"}


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hw):
        raise PPAPError(f"{what} must be a positive int or (height, width); got {size!r}")
    return (int(hw[0]), int(hw[1]))


def _field(obj: Any, key: str) -> Any:
    """A key of a dict or a transformers SizeDict / ModelOutput, or an attribute; None if absent."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _dtype_of(net: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype ``net`` computes in: that of its first floating-point parameter (``default``
    when it has none)."""
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), default)


def _resample_mode(resample: Any) -> str:
    """A processor's ``resample`` (PIL int or enum, or torchvision InterpolationMode) -> torch mode."""
    if isinstance(getattr(resample, "value", None), str):  # torchvision InterpolationMode
        return resample.value if resample.value in RESIZE_MODES else "bilinear"
    return PIL_RESAMPLE.get(int(resample), "bilinear")


class GuideModel(nn.Module):
    """``net`` plus its input pre-processing and output reading, on diffusion images in [-1, 1].

    ``forward(x)``: ``x`` [B, C, H, W] in [-1, 1] -> a plain tensor: [B, K] logits
    (classification), [B, K, H', W'] (segmentation, dense; [B, 1, H', W'] for depth) with
    (H', W') = (H, W) when ``dense_size="input"``, in x's dtype. ``net`` runs as a fixed function:
    in eval mode (BatchNorm statistics and dropout belong to the clean-image training) and with no
    gradient for its weights, for the call only (``frozen``): the caller's net keeps its own mode
    and ``requires_grad``. Gradients flow to ``x``. A float16 / bfloat16 net gets its input cast
    to its dtype; the preprocessing and the output stay in x's dtype (float32 for the sampler).
    ``mean``/``std`` are in [0, 1] pixel units, one value or one per channel; ``in_channels``
    defaults to ``len(mean)`` when that is above 1.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        input_size: int | tuple[int, int] | None = None,
        resize: str = "bilinear",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        in_channels: int | None = None,
        output: str | Callable | None = None,
        task: str | None = None,
        dense_size: str | tuple[int, int] | None = "input",
        classes: tuple[str, ...] | None = None,
        ref: str = "in-memory",
    ):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise PPAPError(f"resize must be one of {', '.join(RESIZE_MODES)}; got {resize!r}")
        if task is not None and task not in TASKS:
            raise PPAPError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
        if output is not None and not (isinstance(output, str) or callable(output)):
            raise PPAPError(f"output must be None, a field name or a callable; got {output!r}")
        if (mean is None) != (std is None):
            raise PPAPError(f"give mean and std together or neither; got mean={mean!r}, std={std!r}")
        if in_channels is not None and (not isinstance(in_channels, int) or in_channels < 1):
            raise PPAPError(f"in_channels must be a positive int; got {in_channels!r}")
        if not (dense_size is None or dense_size == "input"):
            dense_size = _pair(dense_size, "dense_size")  # type: ignore[arg-type]
        self.net = net
        self.input_size = None if input_size is None else _pair(input_size, "input_size")
        self.resize, self.output, self.task, self.dense_size = resize, output, task, dense_size
        self.classes = None if classes is None else tuple(classes)
        self.ref = ref
        self.mean = self.std = None
        scale = shift = None
        if mean is not None:
            self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)  # type: ignore[union-attr]
            if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
                raise PPAPError(f"mean and std must have the same length and std > 0; got mean={mean!r}, std={std!r}")
            if in_channels is None and len(self.mean) > 1:
                in_channels = len(self.mean)
            if len(self.mean) not in (1, in_channels):
                raise PPAPError(f"mean has {len(self.mean)} values for a net of {in_channels} channels; got {mean!r}")
            m, s = torch.tensor(self.mean).view(1, -1, 1, 1), torch.tensor(self.std).view(1, -1, 1, 1)
            scale, shift = 0.5 / s, (0.5 - m) / s  # (x01 - m) / s with x01 = (x + 1) / 2
        self.in_channels = in_channels
        # not in state_dict: they come from the arguments, and GuideModel's weights are the net's
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)

    def preprocess(self, x: Tensor) -> Tensor:
        """[B, C, H, W] in [-1, 1] -> the net's input [B, in_channels, *input_size]: channels,
        resize (antialiased, as PIL and torchvision resize), then the folded normalisation."""
        c = x.shape[1] if x.ndim == 4 else None
        if c is None or not (c in (1, 3) or c == self.in_channels):
            raise PPAPError(f"x must be [B, C, H, W] with C of 1 or 3 (or in_channels={self.in_channels}); got shape {tuple(x.shape)}")
        want = self.in_channels or c
        if c != want:
            if (c, want) == (1, 3):
                x = x.expand(-1, 3, -1, -1)  # grey as RGB, as PIL's convert("RGB")
            elif (c, want) == (3, 1):
                x = sum(w * x[:, i : i + 1] for i, w in enumerate(LUMA))  # type: ignore[assignment]
            else:
                raise PPAPError(f"cannot convert x of {c} channels to the net's {want}; got shape {tuple(x.shape)}")
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            smooth = self.resize in ("bilinear", "bicubic")
            x = F.interpolate(x, size=self.input_size, mode=self.resize, align_corners=False if smooth else None, antialias=smooth)
        if isinstance(self._scale, Tensor) and isinstance(self._shift, Tensor):
            x = x * self._scale.to(x.dtype) + self._shift.to(x.dtype)
        return x

    def postprocess(self, output: Any, x: Tensor) -> Tensor:
        """The net's raw output -> a plain tensor: the ``output`` field read; [B, H, W] (depth) ->
        [B, 1, H, W]; 4-D outputs resized (bilinear) per ``dense_size``, to x's H, W by default."""
        if callable(self.output):
            out = self.output(output)
        elif isinstance(self.output, str):
            out = _field(output, self.output)
            if out is None:
                have = list(output.keys()) if isinstance(output, Mapping) else type(output).__name__
                raise PPAPError(f"{self.ref}: the net's output has no field {self.output!r}; it has {have}")
        else:
            out = output
        if not isinstance(out, Tensor):
            raise PPAPError(
                f"{self.ref}: the net's output is a {type(out).__name__}, not a tensor; pass output= "
                "(a field name such as 'logits' or a callable)"
            )
        if out.is_floating_point():
            out = out.to(x.dtype)  # a half-precision net's output, back in the caller's dtype
        if self.task == "classification" and out.ndim != 2:
            raise PPAPError(f"{self.ref}: classification output must be [B, K]; got shape {tuple(out.shape)}")
        if self.task != "classification" and out.ndim == 3:
            out = out.unsqueeze(1)  # depth [B, H, W] -> one channel
        if self.task in ("segmentation", "dense") and out.ndim != 4:
            raise PPAPError(f"{self.ref}: {self.task} output must be [B, K, h, w]; got shape {tuple(out.shape)}")
        if out.ndim == 4 and self.dense_size is not None:
            size = (int(x.shape[-2]), int(x.shape[-1])) if self.dense_size == "input" else _pair(self.dense_size, "dense_size")  # type: ignore[arg-type]  # a pair here
            if tuple(out.shape[-2:]) != size:
                out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out

    def forward(self, x: Tensor, net: nn.Module | None = None) -> Tensor:
        """x [B, C, H, W] in [-1, 1] -> the net's output as a tensor. ``net`` replaces ``self.net``
        for this call (a peft-wrapped copy, an expert) with the same pre- and post-processing; it
        runs in its own mode (an expert bank trains it), ``self.net`` frozen for the call."""
        inputs = self.preprocess(x)
        if net is not None:
            return self.postprocess(net(inputs.to(_dtype_of(net, inputs.dtype))), x)
        with frozen(self.net):
            return self.postprocess(self.net(inputs.to(_dtype_of(self.net, inputs.dtype))), x)

    def _apply(self, fn, recurse=True):
        # the folded normalisation acts on x, in x's dtype: a cast of the guide to half precision
        # must not round it, so it follows the device only
        kept = {name: getattr(self, name) for name in ("_scale", "_shift")}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            if value is not None:
                setattr(self, name, value.to(getattr(self, name).device))
        return self

    @property
    def identity(self) -> dict:
        """A small JSON-able description of the guide for manifests."""
        out = (
            self.output if self.output is None or isinstance(self.output, str) else getattr(self.output, "__qualname__", repr(self.output))
        )
        as_list = lambda v: None if v is None else list(v)  # noqa: E731
        return {
            "ref": self.ref,
            "net": type(self.net).__name__,
            "input_size": as_list(self.input_size),
            "resize": self.resize,
            "mean": as_list(self.mean),
            "std": as_list(self.std),
            "in_channels": self.in_channels,
            "output": out,
            "task": self.task,
        }

    @classmethod
    def from_transformers(
        cls, model: nn.Module, image_processor: Any = None, *, task: str | None = None, ref: str | None = None
    ) -> GuideModel:
        """A transformers vision model, pre-processed as its image processor would.

        From the processor: the input size (``crop_size`` when ``do_center_crop``; ppap resizes
        the whole image to it rather than resize-then-crop, since the diffusion image is the whole
        picture; ``{"shortest_edge": s}`` becomes s x s), ``resample``, and mean/std, scaled when
        the processor does not rescale or normalise (assuming it is fed 8-bit images, as PIL
        gives). Without a processor: ``config.image_size`` (None: x's own size) and ImageNet's
        default mean/std, a guess; pass the processor when you have it.
        Tasks by class name: ``*ForImageClassification`` ("logits" [B, K]),
        ``*ForSemanticSegmentation`` ("logits" at a fraction of the input, e.g. 1/4 for SegFormer,
        upsampled to x's size), ``*ForDepthEstimation`` ("predicted_depth" [B, H, W] -> [B, 1, H, W]).
        """
        from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        name, config = type(model).__name__, getattr(model, "config", None)
        if task is None:
            task = next((t for suffix, t in TASK_SUFFIX.items() if name.endswith(suffix)), None)
            if task is None:
                raise PPAPError(f"cannot tell the task of transformers model {name}; pass task= ({', '.join(TASKS)})")
        if task not in TASKS:
            raise PPAPError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
        p = image_processor
        if p is None:
            size, resize = getattr(config, "image_size", None), "bilinear"
            mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        else:
            size = None
            if _field(p, "do_center_crop") and _field(p, "crop_size") is not None:
                size = _field(p, "crop_size")
            elif _field(p, "do_resize") is not False:
                size = _field(p, "size")
            if size is not None and not isinstance(size, (int, list, tuple)):
                h, w, edge = _field(size, "height"), _field(size, "width"), _field(size, "shortest_edge")
                if h is not None and w is not None:
                    size = (h, w)
                elif edge is not None:
                    size = edge
                else:
                    raise PPAPError(f"image processor size {size!r}: expected height/width or shortest_edge")
            resample = _field(p, "resample")
            resize = "bilinear" if resample is None else _resample_mode(resample)
            # what the processor feeds the net, per 8-bit unit: rescale_factor (1/255) or 1
            unit = _field(p, "rescale_factor") if _field(p, "do_rescale") is not False else 1.0
            pix = 255.0 * (1 / 255 if unit is None else float(unit))
            pix = 1.0 if abs(pix - 1.0) < 1e-9 else pix
            if _field(p, "do_normalize") is False:
                mean, std = (0.0,), (1.0,)
            else:
                mean = _field(p, "image_mean") if _field(p, "image_mean") is not None else IMAGENET_DEFAULT_MEAN
                std = _field(p, "image_std") if _field(p, "image_std") is not None else IMAGENET_DEFAULT_STD
                mean = [mean] if isinstance(mean, (int, float)) else mean
                std = [std] if isinstance(std, (int, float)) else std
            # (x01 * pix - m) / s == (x01 - m / pix) / (s / pix)
            mean, std = [m / pix for m in mean], [s / pix for s in std]
        classes = None
        id2label = getattr(config, "id2label", None) or {}
        labels = [id2label[i] for i in sorted(id2label)]
        if task != "dense" and labels and labels != [f"LABEL_{i}" for i in range(len(labels))]:
            classes = tuple(labels)
        return cls(
            model,
            input_size=size,
            resize=resize,
            mean=mean,
            std=std,
            in_channels=getattr(config, "num_channels", None),
            output=OUTPUT_FOR_TASK[task],
            task=task,
            classes=classes,
            ref=ref or getattr(config, "_name_or_path", "") or "in-memory",
        )

    @classmethod
    def from_pretrained(
        cls, pretrained: str, *, revision: str | None = None, subfolder: str | None = None, task: str | None = None
    ) -> GuideModel:
        """A transformers vision model and its image processor (``from_transformers``) from a
        folder or a hub id ``org/name[@revision]``, safetensors weights only; a zoo guide's name
        also works. See :mod:`ppap.hub` for how references are resolved."""
        from .loading import load_guide

        return load_guide(pretrained, task=task, revision=revision, subfolder=subfolder)

    @classmethod
    def from_timm(cls, model: nn.Module, *, ref: str | None = None) -> GuideModel:
        """A timm classifier: input size, interpolation, mean and std from
        ``timm.data.resolve_data_config({}, model=model)``. timm's ``crop_pct`` centre crop is not
        applied: the whole diffusion image is resized to the input size."""
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        c, h, w = cfg["input_size"]
        resize = cfg.get("interpolation", "bicubic")
        pretrained = getattr(model, "pretrained_cfg", None) or {}
        return cls(
            model,
            input_size=(h, w),
            resize=resize if resize in RESIZE_MODES else "bicubic",
            mean=cfg["mean"],
            std=cfg["std"],
            in_channels=c,
            output=None,
            task="classification",
            ref=ref or pretrained.get("hf_hub_id") or pretrained.get("architecture") or "in-memory",
        )

    @classmethod
    def from_torchvision(cls, model: nn.Module, weights: Any = None, *, task: str | None = None, ref: str | None = None) -> GuideModel:
        """A torchvision model; ``weights`` (a ``WeightsEnum`` member or its name) gives, through
        ``weights.transforms()``, the crop size (segmentation: the resize size), mean, std and
        interpolation, and ``weights.meta["categories"]`` the classes. Without weights: x's own
        size and ImageNet's mean/std. Segmentation models return a dict: its "out" is read."""
        from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        if isinstance(weights, str):
            from torchvision.models import get_weight

            weights = get_weight(weights)
        module = type(model).__module__
        if task is None:
            if module.startswith("torchvision.models.segmentation"):
                task = "segmentation"
            elif module.startswith("torchvision.models") and not any(k in module for k in ("detection", "video", "optical_flow")):
                task = "classification"
            else:
                raise PPAPError(f"cannot tell the task of torchvision model {type(model).__name__} ({module}); pass task=")
        size, resize, mean, std, classes = None, "bilinear", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, None
        if weights is not None:
            t = weights.transforms()
            size = getattr(t, "crop_size", None) or getattr(t, "resize_size", None)
            size = None if not size else (size[0], size[-1])  # a one-element list means square
            resize = _resample_mode(t.interpolation) if getattr(t, "interpolation", None) is not None else resize
            mean, std = t.mean, t.std
            classes = tuple(weights.meta["categories"]) if weights.meta.get("categories") else None
        return cls(
            model,
            input_size=size,
            resize=resize,
            mean=mean,
            std=std,
            in_channels=3,
            output="out" if task == "segmentation" else None,
            task=task,
            classes=classes,
            ref=ref or (str(weights) if weights is not None else "in-memory"),
        )
