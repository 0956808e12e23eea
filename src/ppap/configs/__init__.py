"""Published architectures at their real sizes (configurations only, no weights).

Each entry is the configuration of a public model: a diffusers UNet with its scheduler, or a
transformers vision model with its image processor (``preprocessor_config.json``: size,
resample, mean / std). ``build_model_folder`` writes one with random weights in the layout its
library saves, so that ppap loads it exactly as it loads a user's downloaded model: a diffusers
pipeline folder (``unet/`` + ``scheduler/``) or a transformers ``save_pretrained`` folder with its
processor. ``count_parameters`` counts without allocating (the model is built on the ``meta``
device). Used by ``ppap bench scale`` and the real-size end-to-end test.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..io import PPAPError, give_usual_permissions, read_json

CONFIG_ROOT = Path(__file__).parent


@dataclass(frozen=True)
class Architecture:
    name: str  # the folder under ppap/configs
    kind: str  # "diffusion" (diffusers UNet + scheduler) or "guide" (transformers model + image processor)
    source: str  # the public model whose configuration this is
    parameters: int  # parameter count given by the model card or paper (checked by the tests)
    description: str


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture(
            "ddpm-cifar10-32", "diffusion", "google/ddpm-cifar10-32", 35_700_000, "DDPM CIFAR-10 UNet2DModel, 32x32, linear betas"
        ),
        Architecture(
            "ddpm-celebahq-256", "diffusion", "google/ddpm-celebahq-256", 113_700_000, "DDPM CelebA-HQ UNet2DModel, 256x256, linear betas"
        ),
        Architecture(
            "adm-imagenet-64",
            "diffusion",
            "ADM ImageNet-64 (Dhariwal & Nichol 2021; diffusers layout of openai/diffusers-cd_imagenet64_l2)",
            296_000_000,
            "class-conditional UNet2DModel (1000 classes), 64x64, learned variance (6 output channels), cosine betas",
        ),
        Architecture(
            "if-i-m-64",
            "diffusion",
            "IF stage I (DeepFloyd/IF-I-M-v1.0) layout at ADM-64 widths",
            371_600_000,
            "text-conditional UNet2DConditionModel, 64x64, cross-attention to T5-XXL-like [77, 4096] embeddings, learned variance; "
            "IF-I-M has 400M parameters, this one 372M; its scheduler without IF's dynamic thresholding",
        ),
        Architecture("resnet-50", "guide", "microsoft/resnet-50", 25_600_000, "ResNet-50 classifier, 224 input (shortest edge), bicubic"),
        Architecture(
            "vit-base-patch16-224", "guide", "google/vit-base-patch16-224", 86_600_000, "ViT-B/16 classifier, 224x224 input, bilinear"
        ),
        Architecture(
            "segformer-b0-ade-512",
            "guide",
            "nvidia/segformer-b0-finetuned-ade-512-512",
            3_750_000,
            "SegFormer-B0 semantic segmentation (150 ADE20k classes), 512x512 input, logits at 1/4",
        ),
        Architecture("dpt-large", "guide", "Intel/dpt-large", 343_000_000, "DPT-Large (ViT-L/16) depth estimation, 384x384 input"),
    )
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise PPAPError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def config_dir(name: str) -> Path:
    """The folder holding ``name``'s JSON files."""
    return CONFIG_ROOT / architecture(name).name


def _unet_class(config: dict):
    import diffusers

    return getattr(diffusers, config["_class_name"])


def _transformers_class(config: dict):
    import transformers

    return getattr(transformers, config["architectures"][0])


def instantiate(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """``name``'s model with the library's own random initialisation, on ``device`` ("meta":
    shapes only, nothing allocated)."""
    arch, folder = architecture(name), config_dir(name)
    with torch.device(device):
        if arch.kind == "diffusion":
            config = read_json(folder / "unet_config.json", f"{name} UNet config")
            return _unet_class(config).from_config(config)
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        return _transformers_class(read_json(folder / "config.json", f"{name} config"))(config)


def count_parameters(name: str) -> int:
    """The number of parameters of ``name``, counted on the meta device (no memory, no init)."""
    return sum(p.numel() for p in instantiate(name, "meta").parameters())


def build_model_folder(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write ``name`` with random weights (seeded) to ``folder``, as its library saves it: a
    diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a transformers
    model folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``). Written
    beside it and renamed when complete, so an existing folder is a finished one and is kept."""
    arch, src, folder = architecture(name), config_dir(name), Path(folder)
    if folder.exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(seed)
    model = instantiate(name)
    if arch.kind == "diffusion":
        from ..diffusion import Diffusion, NoiseSchedule

        schedule = NoiseSchedule.from_config(read_json(src / "scheduler_config.json", f"{name} scheduler config"))
        Diffusion(model, schedule, name=name).save_pretrained(partial)
    else:
        model.save_pretrained(partial, safe_serialization=True)
        give_usual_permissions(partial)  # safetensors' save_file leaves 0600
        shutil.copyfile(src / "preprocessor_config.json", partial / "preprocessor_config.json")
    partial.rename(folder)
    return folder


def describe() -> list[dict]:
    """Every architecture with its counted parameters (for reports)."""
    return [{"name": a.name, "kind": a.kind, "source": a.source, "parameters": count_parameters(a.name)} for a in ARCHITECTURES.values()]


__all__ = ["ARCHITECTURES", "Architecture", "architecture", "build_model_folder", "config_dir", "count_parameters", "instantiate"]
