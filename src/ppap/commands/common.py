"""What several commands take from their flags: the diffusion pipeline and its conditions
(``--diffusion``, ``--device``, ``--class-label``, ...), a checked ``--out``, numbers given as
text, and the accelerator that splits the work between processes."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import PPAPError


def accelerator():
    """The ``Accelerator`` of this process: one of several under ``accelerate launch``, else the only one."""
    import torch
    from accelerate import Accelerator

    # cpu=True on a GPU-less machine makes `accelerate launch --multi_gpu` start a gloo
    # process group (MULTI_CPU) instead of silently running N independent copies
    return Accelerator(cpu=not torch.cuda.is_available())


def pipeline_from_flags(args):
    """The ``PPAPPipeline`` of ``--diffusion`` on ``--device`` in ``--dtype`` at ``--revision``."""
    from ..loading import load_pipeline

    return load_pipeline(args.diffusion, device=args.device, dtype=args.dtype, revision=args.revision)


def conditioning_from_flags(args, num: int, pipe=None):
    """The UNet's conditions from ``--class-label`` / ``--negative-class-label`` /
    ``--prompt`` / ``--negative-prompt`` (encoded by ``pipe``'s text encoder) /
    ``--prompt-embeds`` / ``--cfg-scale``."""
    import torch

    from ..diffusion import Conditioning
    from ..io import load_safetensors

    labels = None
    if args.class_label:
        try:
            values = [int(v) for v in args.class_label.split(",")]
        except ValueError:
            raise PPAPError(f"bad --class-label {args.class_label!r}: use integers, e.g. '3' or '0,1,2' (cycled)") from None
        labels = torch.tensor([values[k % len(values)] for k in range(num)])
    embeds = negative = None
    if args.prompt_embeds:
        tensors = load_safetensors(args.prompt_embeds)
        if "prompt_embeds" not in tensors:
            raise PPAPError(f"{args.prompt_embeds} has no 'prompt_embeds' tensor (found: {', '.join(sorted(tensors)) or 'none'})")
        embeds, negative = tensors["prompt_embeds"].float(), tensors.get("negative_prompt_embeds")
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3:
            raise PPAPError(f"prompt_embeds in {args.prompt_embeds} must be [L, D] or [N, L, D], got {list(embeds.shape)}")
        embeds = embeds[torch.arange(num) % embeds.shape[0]]
        if negative is not None:
            negative = (negative[None] if negative.ndim == 2 else negative).float()
            negative = negative[torch.arange(num) % negative.shape[0]]
    if args.prompt is not None:
        if args.prompt_embeds:
            raise PPAPError("give --prompt or --prompt-embeds, not both")
        embeds, negative = pipe.encode_prompt(args.prompt, args.negative_prompt, args.cfg_scale > 1)
        embeds, negative = embeds.expand(num, -1, -1), None if negative is None else negative.expand(num, -1, -1)
    elif args.negative_prompt is not None:
        raise PPAPError("--negative-prompt needs --prompt")
    if labels is None and embeds is None:
        if args.cfg_scale != 1.0:
            raise PPAPError("--cfg-scale needs a conditional model's --class-label, --prompt or --prompt-embeds")
        return None
    null = args.negative_class_label
    if null is not None and labels is None:
        raise PPAPError("--negative-class-label needs --class-label")
    if null is None and labels is not None and embeds is None and args.cfg_scale > 1:
        raise PPAPError("--cfg-scale above 1 with --class-label needs --negative-class-label N, the model's null class")
    null_labels = None if null is None else torch.full((num,), null)
    return Conditioning(labels, embeds, negative, null_labels, args.cfg_scale)


def check_out(path: str | Path, kind: str = "folder") -> Path:
    """``--out``: no file in the way of a folder (or a folder in the way of a file), checked
    before anything is computed or written."""
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise PPAPError(f"--out {path} is a file, not a folder")
    if kind == "file" and path.is_dir():
        raise PPAPError(f"--out {path} is a directory")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise PPAPError(f"--out {path}: {parent} is a file, not a folder")
    return path


def comma_ints(text: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of integers given to ``flag`` ("" for none); the caller checks their range."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PPAPError(f"bad {flag} {text!r}: use integers, e.g. '1,8'") from None


def finite_number(value, what: str) -> float | None:
    """``value`` (a number or its text) as a finite float, None as None; else a one-line error naming ``what``."""
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        raise PPAPError(f"bad {what} {value!r}: expected a number") from None
    if not math.isfinite(v):
        raise PPAPError(f"bad {what} {value!r}: expected a finite number")
    return v
