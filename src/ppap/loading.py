"""Models by reference, for the CLI, the demo and the benches.

* a diffusion model: a zoo name or a diffusers pipeline / UNet directory -> ``PPAPPipeline``;
* a guidance model: a zoo name, a transformers model folder (``config.json`` + safetensors, with
  its image processor when saved), or ``package.module:function`` plus a safetensors file ->
  ``GuideModel``;
* experts: a zoo name or a directory written by ``ppap train`` -> an ``ExpertBank`` on a guide.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import zoo
from .diffusion import Diffusion, model_files
from .experts import ExpertBank, load_bank
from .guide_model import GuideModel
from .io import PPAPError, load_weights_into, read_json, resolve_factory
from .pipeline import PPAPPipeline

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


def diffusion_location(ref: str) -> Path:
    return zoo.get(ref, "diffusion").location if zoo.is_zoo_name(ref) else Path(ref)


def load_diffusion(ref: str) -> Diffusion:
    diffusion = Diffusion.from_pretrained(diffusion_location(ref))
    diffusion.name = ref
    return diffusion


def load_pipeline(ref: str, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None) -> PPAPPipeline:
    """The pipeline of a zoo name or a diffusers directory, its UNet on ``device`` in ``dtype``;
    its scheduler of the class the folder saved (as diffusers' ``from_pretrained``)."""
    diffusion = load_diffusion(ref)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    pipe = PPAPPipeline(unet=diffusion.unet, scheduler=load_scheduler(model_files(diffusion_location(ref))[1]))
    pipe.register_to_config(_name_or_path=ref)
    pipe.to(device)
    if dtype != torch.float32:
        pipe.unet.to(dtype)  # the UNet only: the sampler state and guidance stay float32
    return pipe


def load_scheduler(config_file: Path):
    """The diffusers scheduler of a ``scheduler_config.json``, of the class its ``_class_name``
    names (DDPMScheduler when it names none)."""
    import diffusers

    config = read_json(config_file, "scheduler config")
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.endswith("Scheduler") else None
    if cls is None:
        raise PPAPError(f"{config_file}: unknown scheduler class {name!r}")
    try:
        return cls.from_config(config)
    except (ValueError, TypeError) as e:  # diffusers refuses some option combinations at construction
        raise PPAPError(f"{config_file}: cannot build {name} ({e})") from None


def load_guide(ref: str, weights: str | None = None, task: str | None = None) -> GuideModel:
    """A frozen ``GuideModel``; ``weights`` is required for factory references."""
    if zoo.is_zoo_name(ref):
        entry = zoo.get(ref, "guide")
        net = resolve_factory(entry.factory)()
        load_weights_into(net, weights or entry.location)
        return GuideModel(net, task=task or entry.task, classes=entry.classes or None, ref=ref)
    if Path(ref).is_dir():
        return _load_transformers_guide(Path(ref), task)
    factory = resolve_factory(ref)
    if weights is None:
        raise PPAPError(f"--guide {ref} is a factory reference: also pass --guide-weights FILE.safetensors")
    try:
        net = factory()
    except Exception as e:
        raise PPAPError(f"factory {ref} failed: {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise PPAPError(f"factory {ref} returned {type(net).__name__}, not a torch.nn.Module")
    load_weights_into(net, weights)
    return GuideModel(net, task=task, ref=ref)


def _load_transformers_guide(folder: Path, task: str | None) -> GuideModel:
    """A transformers model folder (``save_pretrained``), with its image processor when present."""
    config = read_json(folder / "config.json", "transformers model config")
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures:
        raise PPAPError(f"{folder} is not a transformers model folder (config.json has no 'architectures')")
    try:
        import transformers
    except ImportError:
        raise PPAPError(f"{folder} is a transformers model: install transformers (pip install transformers)") from None
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise PPAPError(f"{folder}: transformers has no class {architectures[0]!r}")
    if not any(folder.glob("*.safetensors")):
        raise PPAPError(f"{folder} has no .safetensors weights (ppap does not load pickled weights)")
    try:
        model = cls.from_pretrained(folder, use_safetensors=True)
    except Exception as e:
        raise PPAPError(f"cannot load {architectures[0]} from {folder} ({str(e).splitlines()[0][:200]})") from None
    processor = None
    if (folder / "preprocessor_config.json").exists():
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(folder)
        except Exception as e:
            raise PPAPError(f"cannot load the image processor in {folder} ({str(e).splitlines()[0][:200]})") from None
    return GuideModel.from_transformers(model, processor, task=task, ref=str(folder))


def experts_location(ref: str | os.PathLike) -> Path:
    return zoo.get(str(ref), "experts").location if zoo.is_zoo_name(str(ref)) else Path(ref)


def load_experts(ref: str | os.PathLike, guide: GuideModel, diffusion: Diffusion) -> ExpertBank:
    """The bank ``ref`` on ``guide`` (whose net receives the adapters: pass a copy you do not
    need unadapted). A zoo bank's measured best scale becomes its ``default_scale``."""
    bank = load_bank(guide, experts_location(ref), schedule=diffusion.schedule)
    entry = zoo.ZOO.get(str(ref))
    if bank.default_scale is None and entry is not None:
        bank.default_scale = entry.scale
    return bank
