"""Training recipes for the colour zoo models on colour Fashion-MNIST (``ppap zoo train NAME``).

``fashion-rgb-ddpm``: a text-conditional diffusers ``UNet2DConditionModel`` (3x32x32, epsilon
prediction) with cross-attention to a small ``CLIPTextModel`` trained with it, on prompts that name
the image's colour (``ppap.fashion_rgb``), 10% of them empty for classifier-free guidance. It is
trained by the DDPM loop of ``ppap.recipes.train_denoiser`` (seeded, checkpointed, exactly
resumable, EMA) and saved as a ``PPAPPipeline`` folder with ``text_encoder/`` and ``tokenizer/``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .fashion_rgb import PROMPT_MAX_LENGTH, PROMPT_TEMPLATES, PROMPT_WORDS, all_prompts, draw_prompts, load_fashion_rgb, tint, to_unit
from .io import PPAPError, atomic_write_json
from .recipes import DenoiserTraining, swap_in_dir, train_denoiser
from .text import build_text_encoder, build_word_tokenizer, encode_text, tokenize


@dataclass(frozen=True)
class TextDDPMRecipe:
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # UNet widths per resolution 32/16/8
    layers_per_block: int = 1  # ResNet blocks per resolution
    cross_attention_levels: tuple[int, ...] = (2,)  # resolutions with a transformer block (2 = 8x8); the mid block has one too
    attention_head_dim: int = 32  # channels per attention head
    text_width: int = 64  # the text encoder's hidden size = the UNet's cross_attention_dim
    text_layers: int = 2
    text_heads: int = 2
    empty_prompt_prob: float = 0.1  # prompts replaced by "" (the unconditional branch of CFG)
    colour_seed: int = 0  # colour Fashion-MNIST's colour draw
    num_train_timesteps: int = 1000  # T
    beta_schedule: str = "linear"  # DDPM's linear betas 1e-4..0.02
    iterations: int = 7000  # optimiser steps
    batch_size: int = 64
    lr: float = 5e-4  # AdamW, after a linear warm-up
    warmup: int = 200
    ema_decay: float = 0.9995  # with the usual (1+s)/(10+s) warm-up
    checkpoint_every: int = 100
    seed: int = 0


RGB_DDPM_RECIPE = TextDDPMRecipe()
# seconds-scale: the tests' check of the whole recipe (loop, resume, export, reload)
TINY_RGB_DDPM_RECIPE = TextDDPMRecipe(
    block_out_channels=(8, 16), text_width=16, text_heads=2, attention_head_dim=8, cross_attention_levels=(1,), iterations=4, batch_size=4
)


def build_prompt_tokenizer():
    """The word-level tokenizer of the colour prompts (``PROMPT_WORDS``, ``PROMPT_MAX_LENGTH`` tokens)."""
    return build_word_tokenizer(PROMPT_WORDS, PROMPT_MAX_LENGTH)


def build_rgb_unet(r: TextDDPMRecipe) -> nn.Module:
    from diffusers import UNet2DConditionModel

    n = len(r.block_out_channels)
    down = tuple("CrossAttnDownBlock2D" if i in r.cross_attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if n - 1 - i in r.cross_attention_levels else "UpBlock2D" for i in range(n))
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=r.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=r.layers_per_block,
        cross_attention_dim=r.text_width,
        attention_head_dim=tuple(c // r.attention_head_dim for c in r.block_out_channels),  # diffusers' name: heads per block
        norm_num_groups=8,
    )


class TextConditionedUNet(nn.Module):
    """The UNet and its text encoder, trained together: ``(x_t, t, input_ids [B, L]) -> eps``."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet: nn.Module = unet
        self.text_encoder: nn.Module = text_encoder

    def forward(self, x_t: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        return self.unet(x_t, t, encoder_hidden_states=encode_text(self.text_encoder, input_ids)).sample


def build_text_conditioned_unet(r: TextDDPMRecipe, vocab_size: int) -> TextConditionedUNet:
    unet = build_rgb_unet(r)
    text_encoder = build_text_encoder(vocab_size, PROMPT_MAX_LENGTH, width=r.text_width, layers=r.text_layers, heads=r.text_heads)
    return TextConditionedUNet(unet, text_encoder)


def prompt_ids(tokenizer) -> tuple[Tensor, Tensor]:
    """Token ids of every training prompt [colours, templates, L] and of the empty prompt [L]."""
    prompts = all_prompts()
    ids = tokenize(tokenizer, [p for row in prompts for p in row]).reshape(len(prompts), len(PROMPT_TEMPLATES), -1)
    return ids, tokenize(tokenizer, [""])[0]


def train_rgb_ddpm(
    out_dir: str | Path,
    work_dir: str | Path,
    r: TextDDPMRecipe = RGB_DDPM_RECIPE,
    data_dir=None,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train ``fashion-rgb-ddpm``; export the EMA UNet + text encoder as a ``PPAPPipeline`` folder."""
    data = load_fashion_rgb("train", data_dir, seed=r.colour_seed)
    tokenizer = build_prompt_tokenizer()
    ids, empty_ids = prompt_ids(tokenizer)

    def inputs(batch: tuple[Tensor, ...], g: torch.Generator) -> tuple[Tensor, tuple]:
        grey, colours = batch
        templates, empty = draw_prompts(colours, r.empty_prompt_prob, g)
        batch_ids = torch.where(empty[:, None], empty_ids, ids[colours, templates])
        return to_unit(tint(grey, colours)), (batch_ids,)

    def export(ema: nn.Module, scheduler, out: Path) -> None:
        from .pipeline import PPAPPipeline

        assert isinstance(ema, TextConditionedUNet)
        pipe = PPAPPipeline(unet=ema.unet, scheduler=scheduler, text_encoder=ema.text_encoder, tokenizer=tokenizer)
        swap_in_dir(out, pipe.save_pretrained)

    spec = DenoiserTraining(
        "fashion-rgb-ddpm", lambda: build_text_conditioned_unet(r, len(tokenizer)), (data.grey, data.colours), inputs, export
    )
    return train_denoiser(spec, r, out_dir, work_dir, stop_after=stop_after, device=device)


# --------------------------------------------------------------------------------------------
# fashion-rgb-classifier, fashion-rgb-segmenter (the off-the-shelf guides) and
# fashion-rgb-evaluator (the judge): transformers models trained on clean colour images only,
# through their own image processor's preprocessing (ppap's GuideModel, as guidance runs them)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RGBGuideRecipe:
    architecture: str  # "resnet" (ResNetForImageClassification) | "segformer" | "regnet"
    hidden_sizes: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (1, 1, 1)
    groups_width: int = 16  # regnet: channels per group of its grouped 3x3 convolutions
    epochs: float = 5  # passes over the 60k training images
    batch_size: int = 128
    lr: float = 2e-3  # AdamW peak, cosine-decayed to 0 over the run
    weight_decay: float = 0.05
    augment: bool = False  # random +-2 px shifts and horizontal flips
    label_smoothing: float = 0.0
    input_size: int = 64  # the image processor resizes 32 -> this
    checkpoint_every: int = 200
    seed: int = 0
    colour_seed: int = 0


RGB_GUIDE_RECIPES = {
    "fashion-rgb-classifier": RGBGuideRecipe("resnet", epochs=5),
    # background + 10 garment classes per pixel, logits at 1/4 of the input (16 x 16)
    "fashion-rgb-segmenter": RGBGuideRecipe("segformer", hidden_sizes=(32, 64), depths=(1, 1), epochs=3, seed=2),
    # another architecture, trained separately with augmentation; never guides
    "fashion-rgb-evaluator": RGBGuideRecipe(
        "regnet", hidden_sizes=(48, 96, 192), depths=(1, 2, 2), epochs=8, augment=True, label_smoothing=0.1, seed=1
    ),
}
# seconds-scale versions for the tests
TINY_RGB_GUIDE_RECIPES = {
    name: replace(r, hidden_sizes=(8, 16), depths=(1, 1), groups_width=8, epochs=10 / 60_000, batch_size=4, input_size=16)  # 2 steps
    for name, r in RGB_GUIDE_RECIPES.items()
}


def build_rgb_guide(r: RGBGuideRecipe) -> tuple[Any, Any]:
    """The transformers model of a recipe (random weights, the global RNG) and its image processor:
    8-bit RGB rescaled to [0, 1], resized to ``input_size`` (bilinear), ImageNet mean and std."""
    import transformers
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from .fashion_mnist import FASHION_MNIST_CLASSES
    from .zoo import SEGMENTER_CLASSES

    classes = SEGMENTER_CLASSES if r.architecture == "segformer" else FASHION_MNIST_CLASSES
    labels = {"id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}}
    sizes, depths = list(r.hidden_sizes), list(r.depths)
    if r.architecture == "resnet":
        config = transformers.ResNetConfig(embedding_size=sizes[0], hidden_sizes=sizes, depths=depths, layer_type="basic", **labels)
        model = transformers.ResNetForImageClassification(config)
    elif r.architecture == "regnet":  # RegNetY: grouped bottlenecks with squeeze-and-excitation
        config = transformers.RegNetConfig(embedding_size=32, hidden_sizes=sizes, depths=depths, groups_width=r.groups_width, **labels)
        model = transformers.RegNetForImageClassification(config)
    elif r.architecture == "segformer":
        n = len(sizes)
        config = transformers.SegformerConfig(
            num_encoder_blocks=n,
            depths=depths,
            hidden_sizes=sizes,
            sr_ratios=[2] * (n - 1) + [1],
            num_attention_heads=[max(1, c // 32) for c in sizes],
            patch_sizes=[7] + [3] * (n - 1),
            strides=[4] + [2] * (n - 1),
            mlp_ratios=[2] * n,
            decoder_hidden_size=sizes[-1],
            classifier_dropout_prob=0.0,  # no dropout: a resumed run draws nothing from the global RNG
            drop_path_rate=0.0,
            **labels,
        )
        model = transformers.SegformerForSemanticSegmentation(config)
    else:
        raise PPAPError(f"unknown architecture {r.architecture!r}; valid: resnet, regnet, segformer")
    processor = transformers.ViTImageProcessor(
        do_resize=True,
        size={"height": r.input_size, "width": r.input_size},
        resample=2,  # PIL bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )
    return model, processor


def rgb_guide_targets(r: RGBGuideRecipe, grey: Tensor, labels: Tensor) -> Tensor:
    """Classes [B], or per-pixel labels [B, 32, 32] (0 background, 1 + class on the garment) from
    the grey image's foreground (``ppap.models.segmentation_labels``)."""
    from .images import uint8_to_unit
    from .models import segmentation_labels

    return segmentation_labels(uint8_to_unit(grey), labels) if r.architecture == "segformer" else labels


@torch.no_grad()
def rgb_guide_figures(r: RGBGuideRecipe, guide: nn.Module, data, batch_size: int = 500) -> dict:
    """Test accuracy, or pixel accuracy and mIoU (11 labels), of the guide (eval mode) on ``data``."""
    from .metrics import mean_iou

    guide.eval()
    outs = [guide(data.images(slice(i, i + batch_size))).argmax(1) for i in range(0, len(data), batch_size)]
    pred, truth = torch.cat(outs), rgb_guide_targets(r, data.grey, data.labels)
    if r.architecture != "segformer":
        return {"test_accuracy": (pred == truth).float().mean().item()}
    return {"test_pixel_accuracy": (pred == truth).float().mean().item(), "test_miou": mean_iou(pred, truth, 11)}


def train_rgb_guide(
    name: str, out_dir: str | Path, work_dir: str | Path, r: RGBGuideRecipe | None = None, data_dir=None, stop_after: int | None = None
) -> dict:
    """Supervised training (``ppap.recipes.train_supervised``) of a colour guide on clean colour
    Fashion-MNIST; writes the model and its image processor with ``save_pretrained``, and a card."""
    import torch.nn.functional as F

    from .guide_model import GuideModel
    from .recipes import augment_batch, step_generator, train_supervised

    r = r or RGB_GUIDE_RECIPES[name]
    torch.manual_seed(r.seed)
    model, processor = build_rgb_guide(r)
    guide = GuideModel.from_transformers(model, processor)  # the preprocessing guidance will run
    data = load_fashion_rgb("train", data_dir, seed=r.colour_seed)

    def step_loss(batch: tuple[Tensor, ...], step: int) -> Tensor:
        grey, colours, labels = batch
        x = to_unit(tint(grey, colours))
        if r.augment:  # the same shift / flip of the image and of its grey foreground
            g = step_generator(r.seed, step)
            both = augment_batch(torch.cat([x, grey.float() / 127.5 - 1], 1), g)
            x, grey = both[:, :3], ((both[:, 3:] + 1) * 127.5).round().to(torch.uint8)
        out = guide(x, net=model)  # logits [B, K], or [B, K, 32, 32] upsampled as guidance sees them
        return F.cross_entropy(out, rgb_guide_targets(r, grey, labels), label_smoothing=r.label_smoothing)

    step, total, elapsed = train_supervised(name, model, (data.grey, data.colours, data.labels), step_loss, r, work_dir, stop_after)
    if step < total:
        return {"step": step, "done": False}
    figures = rgb_guide_figures(r, guide, load_fashion_rgb("test", data_dir, seed=r.colour_seed))

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    swap_in_dir(out_dir, write)
    card = {"recipe": asdict(r), "iterations": step, "train_seconds": round(elapsed, 1), **figures}
    card["parameters"] = sum(p.numel() for p in model.parameters())
    atomic_write_json(Path(out_dir) / "ppap_card.json", card)
    return card | {"done": True}
