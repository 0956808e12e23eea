"""The zoo: small real models trained by ppap's own recipes and shipped inside the package.

A zoo name works wherever a model is accepted (``--diffusion fashion-ddpm --guide
fashion-classifier --experts fashion-ppap5``). ``docs/ZOO.md`` is the model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .fashion_mnist import FASHION_MNIST_CLASSES
from .io import PPAPError

SEGMENTER_CLASSES = ("background",) + FASHION_MNIST_CLASSES


def weights_dir() -> Path:
    return Path(str(resources.files("ppap"))) / "weights"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "diffusion" | "guide" | "experts"
    description: str
    path: str  # file or directory under ppap/weights
    factory: str | None = None  # guide models: "package.module:function"
    task: str = "classification"
    classes: tuple[str, ...] = FASHION_MNIST_CLASSES
    guide: str | None = None  # experts: the zoo guide they adapt
    scale: float | None = None  # experts: their measured best PPAP guidance scale (the default of `ppap sample`)
    reference_fit: str = "resize"  # diffusion: how a reference image of another size is fitted (images.fit_image)

    @property
    def location(self) -> Path:
        return weights_dir() / self.path

    @property
    def available(self) -> bool:
        return self.location.exists()


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            "fashion-ddpm",
            "diffusion",
            "unconditional DDPM, diffusers UNet2DModel 2.6M params, 1x32x32, T=1000 linear, EMA",
            "fashion-ddpm",
            reference_fit="pad",
        ),
        ZooEntry(
            "fashion-rgb-ddpm",
            "diffusion",
            "text-conditional DDPM on colour Fashion-MNIST: diffusers UNet2DConditionModel 3x32x32 + CLIP text encoder (prompts name the colour)",
            "fashion-rgb-ddpm",
            reference_fit="pad",
        ),
        ZooEntry(
            "fashion-classifier",
            "guide",
            "off-the-shelf ResNet classifier trained on clean images only",
            "fashion-classifier.safetensors",
            factory="ppap.models:fashion_classifier",
        ),
        ZooEntry(
            "fashion-evaluator",
            "guide",
            "independent judge (VGG/GroupNorm, augmented); FID features; never guides",
            "fashion-evaluator.safetensors",
            factory="ppap.models:fashion_evaluator",
        ),
        ZooEntry(
            "fashion-rgb-classifier",
            "guide",
            "off-the-shelf transformers ResNetForImageClassification on clean colour images, with its image processor (32 -> 64, ImageNet mean/std)",
            "fashion-rgb-classifier",
        ),
        ZooEntry(
            "fashion-rgb-segmenter",
            "guide",
            "off-the-shelf transformers SegformerForSemanticSegmentation on clean colour images: background + 10 classes per pixel",
            "fashion-rgb-segmenter",
            task="segmentation",
            classes=SEGMENTER_CLASSES,
        ),
        ZooEntry(
            "fashion-rgb-evaluator",
            "guide",
            "independent judge of colour images (transformers RegNetForImageClassification, augmented); never guides",
            "fashion-rgb-evaluator",
        ),
        ZooEntry(
            "fashion-ppap5",
            "experts",
            "5 data-free LoRA experts (rank 32, warm-started) of fashion-classifier on fashion-ddpm samples",
            "fashion-ppap5",
            guide="fashion-classifier",
            scale=30.0,
        ),
        ZooEntry(
            "fashion-segmenter",
            "guide",
            "off-the-shelf segmenter: 11 classes per pixel (background + garment class), clean images only",
            "fashion-segmenter.safetensors",
            factory="ppap.models:fashion_segmenter",
            task="segmentation",
            classes=SEGMENTER_CLASSES,
        ),
        ZooEntry(
            "fashion-edges",
            "guide",
            "off-the-shelf edge estimator (learnt Sobel magnitude map; the depth-like dense model)",
            "fashion-edges.safetensors",
            factory="ppap.models:fashion_edges",
            task="dense",
            classes=(),
        ),
        ZooEntry(
            "fashion-segmenter-ppap5",
            "experts",
            "5 data-free LoRA experts (rank 32, warm-started) of fashion-segmenter on fashion-ddpm samples",
            "fashion-segmenter-ppap5",
            task="segmentation",
            classes=SEGMENTER_CLASSES,
            guide="fashion-segmenter",
            scale=1000.0,
        ),
        ZooEntry(
            "fashion-edges-ppap5",
            "experts",
            "5 data-free LoRA experts (rank 32, warm-started) of fashion-edges on fashion-ddpm samples",
            "fashion-edges-ppap5",
            task="dense",
            classes=(),
            guide="fashion-edges",
            scale=10000.0,
        ),
        ZooEntry(
            "fashion-rgb-ppap5",
            "experts",
            "5 data-free LoRA experts (rank 32, warm-started) of fashion-rgb-classifier on fashion-rgb-ddpm samples "
            "(DDPM-25, prompts cycled over the 8 colours, no CFG)",
            "fashion-rgb-ppap5",
            guide="fashion-rgb-classifier",
            scale=100.0,  # `ppap bench rgb`'s sweep, DDPM-25 (docs/results.md)
        ),
        ZooEntry(
            "fashion-rgb-segmenter-ppap5",
            "experts",
            "5 data-free LoRA experts (rank 32, warm-started) of fashion-rgb-segmenter on fashion-rgb-ddpm samples "
            "(DDPM-25, prompts cycled over the 8 colours, no CFG)",
            "fashion-rgb-segmenter-ppap5",
            task="segmentation",
            classes=SEGMENTER_CLASSES,
            guide="fashion-rgb-segmenter",
            scale=300.0,  # `ppap bench rgb`'s sweep, DDPM-25 (docs/results.md)
        ),
    ]
}


def get(name: str, kind: str | None = None) -> ZooEntry:
    entry = ZOO.get(name)
    if entry is None or (kind is not None and entry.kind != kind):
        valid = ", ".join(n for n, e in ZOO.items() if kind is None or e.kind == kind)
        raise PPAPError(f"unknown zoo {kind or 'model'} {name!r}; valid: {valid}")
    if not entry.available:
        raise PPAPError(f"zoo model {name!r} is not built in this install ({entry.location} missing); run `ppap zoo train {name}`")
    return entry


def is_zoo_name(ref: str) -> bool:
    return ref in ZOO
