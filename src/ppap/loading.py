"""Models by reference, for the CLI, the demo and the benches.

* a diffusion model: a diffusers pipeline / UNet folder, a zoo name or a hub id -> ``PPAPPipeline``;
* a guidance model: a transformers model folder (``config.json`` + safetensors, with its image
  processor when saved), a zoo name, a hub id of such a model, or ``package.module:function``
  plus a safetensors file -> ``GuideModel``;
* experts: a directory written by ``ppap train``, a zoo name or a hub id -> an ``ExpertBank``.

A reference is a local folder first, then a zoo name, then a hub id ``org/name[@revision]``
(:mod:`ppap.hub`); ``revision`` applies to hub ids that name none of their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import zoo
from .banks import ExpertBank
from .diffusion import Diffusion
from .guide_model import GuideModel
from .io import PPAPError, load_weights_into, read_json, resolve_factory
from .pipeline import PPAPPipeline
from .text import load_text_components

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | None = None) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:1`` / ``mps``; None: cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PPAPError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise PPAPError(f"device {name!r} is not available on this machine")
    return device


def resolve_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise PPAPError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def diffusion_location(ref: str) -> str | Path:
    """A local folder as it is, else a zoo name's folder, else ``ref`` (a hub id, or an error)."""
    from . import hub

    if Path(ref).is_dir():
        return Path(ref)
    if zoo.is_zoo_name(ref):
        return zoo.get(ref, "diffusion").location
    if not hub.is_hub_id(ref):
        raise hub.not_found(
            ref, "diffusion model directory", f"a diffusers folder, a zoo name ({hub.zoo_names('diffusion')}) or {hub.HUB_FORM}"
        )
    return ref


def load_diffusion(
    ref: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> Diffusion:
    """``Diffusion.from_pretrained`` of a folder, zoo name or hub id (diffusers' ``subfolder``,
    ``torch_dtype`` and ``variant``)."""
    location = diffusion_location(ref)
    diffusion = Diffusion.from_pretrained(location, revision=revision, subfolder=subfolder, torch_dtype=torch_dtype, variant=variant)
    diffusion.name = ref
    return diffusion


def load_pipeline(
    ref: str,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
) -> PPAPPipeline:
    """The pipeline of a folder, zoo name or hub id, its UNet on ``device`` in ``dtype``
    (``torch_dtype``: diffusers' name for it; give one or the other) and its scheduler of the
    class the folder saved (as diffusers' ``from_pretrained``)."""
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise PPAPError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one")
    dtype = dtype if dtype is not None else torch_dtype
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    from . import hub

    location = diffusion_location(ref)
    if not isinstance(location, Path):  # a hub id: its snapshot, with a text encoder's files when the pipeline has one
        location = hub.download_diffusion(ref, revision=revision, subfolder=subfolder, variant=variant)
    diffusion = load_diffusion(str(location), subfolder=subfolder, torch_dtype=dtype, variant=variant)
    diffusion.name = ref
    # the pipeline folder's text encoder and tokenizer (a text-conditional model's prompts)
    text_encoder, tokenizer = load_text_components(location) if subfolder is None else (None, None)
    # its scheduler of the class the folder saved, as diffusers' from_pretrained does
    pipe = PPAPPipeline(
        unet=diffusion.unet,
        scheduler=load_scheduler(diffusion.scheduler_config or diffusion.schedule.config, ref),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.register_to_config(_name_or_path=ref)
    pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe.unet.to(dtype)  # the UNet only: the sampler state and guidance stay float32
    return pipe


def load_scheduler(config: dict, where: str):
    """The diffusers scheduler of a scheduler config, of the class its ``_class_name`` names
    (DDPMScheduler when it names none)."""
    import diffusers

    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.endswith("Scheduler") else None
    if cls is None:
        raise PPAPError(f"{where}: unknown scheduler class {name!r}")
    try:
        return cls.from_config(config)
    except (ValueError, TypeError) as e:  # diffusers refuses some option combinations at construction
        raise PPAPError(f"{where}: cannot build {name} ({e})") from None


def load_guide(
    ref: str, weights: str | None = None, task: str | None = None, *, revision: str | None = None, subfolder: str | None = None
) -> GuideModel:
    """A frozen ``GuideModel``: a transformers folder, a zoo name, a hub id of a transformers
    model, or a factory ``package.module:function`` (``weights`` required)."""
    from . import hub

    if Path(ref).is_dir() or hub.is_hub_id(ref):  # a zoo name is never a hub id (it has no "/")
        return load_transformers_guide(ref, task=task, revision=revision, subfolder=subfolder)
    if zoo.is_zoo_name(ref):
        entry = zoo.get(ref, "guide")
        if entry.factory is None:  # saved in transformers' format, with its image processor
            return _load_transformers_guide(entry.location, task or entry.task, ref)
        net = resolve_factory(entry.factory)().eval().requires_grad_(False)  # built here: a fixed evaluator
        load_weights_into(net, weights or entry.location)
        return GuideModel(net, task=task or entry.task, classes=entry.classes or None, ref=ref)
    if ":" not in ref:
        raise hub.not_found(
            ref,
            "guidance model",
            f"a transformers model folder, a zoo name ({hub.zoo_names('guide')}), {hub.HUB_FORM} or a factory package.module:function",
        )
    factory = resolve_factory(ref)
    if weights is None:
        raise PPAPError(f"--guide {ref} is a factory reference: also pass --guide-weights FILE.safetensors")
    try:
        net = factory()
    except Exception as e:
        raise PPAPError(f"factory {ref} failed: {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise PPAPError(f"factory {ref} returned {type(net).__name__}, not a torch.nn.Module")
    load_weights_into(net.eval().requires_grad_(False), weights)
    return GuideModel(net, task=task, ref=ref)


TRANSFORMERS_FILES = ("*.json", "model.safetensors", "model-?????-of-?????.safetensors")  # config, processor, weights


def load_transformers_guide(
    ref: str | os.PathLike, *, task: str | None = None, revision: str | None = None, subfolder: str | None = None
) -> GuideModel:
    """A transformers vision model with its image processor, from a folder or a hub id."""
    from . import hub

    if Path(ref).is_dir():
        folder, name = hub.subfolder_of(Path(ref), subfolder, str(ref)), str(ref)
    elif hub.is_hub_id(str(ref)):
        folder = hub.hub_folder(str(ref), TRANSFORMERS_FILES, revision=revision, subfolder=subfolder)
        repo_id, rev = hub.parse_hub_id(str(ref), revision)  # type: ignore[misc]
        name = f"{repo_id}@{rev}" if rev else repo_id
    else:
        raise hub.not_found(str(ref), "transformers model folder", f"a folder or {hub.HUB_FORM}")
    return _load_transformers_guide(folder, task, name)


def _load_transformers_guide(folder: Path, task: str | None, name: str) -> GuideModel:
    """A transformers model folder (``save_pretrained``), with its image processor when present."""
    config = read_json(folder / "config.json", "transformers model config")
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures:
        raise PPAPError(f"{name} is not a transformers model folder (config.json has no 'architectures')")
    try:
        import transformers
    except ImportError:
        raise PPAPError(f"{name} is a transformers model: install transformers (pip install transformers)") from None
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise PPAPError(f"{name}: transformers has no class {architectures[0]!r}")
    from .hub import require_safetensors

    require_safetensors(folder, "model")
    try:
        model = cls.from_pretrained(folder, use_safetensors=True).requires_grad_(False)  # eval mode from from_pretrained
    except Exception as e:
        raise PPAPError(f"cannot load {architectures[0]} from {name} ({str(e).splitlines()[0][:200]})") from None
    processor = None
    if (folder / "preprocessor_config.json").exists():
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(folder)
        except Exception as e:
            raise PPAPError(f"cannot load the image processor of {name} ({str(e).splitlines()[0][:200]})") from None
    return GuideModel.from_transformers(model, processor, task=task, ref=name)


def load_experts(
    ref: str | os.PathLike, guide: GuideModel, diffusion: Diffusion, *, revision: str | None = None, subfolder: str | None = None
) -> ExpertBank:
    """The bank ``ref`` (a folder, zoo name or hub id) on ``guide`` (whose net receives the
    adapters: pass a copy you do not need unadapted). A zoo bank's measured best scale becomes
    its ``default_scale``."""
    return ExpertBank.from_pretrained(guide, ref, revision=revision, subfolder=subfolder, schedule=diffusion.schedule)
