"""Training recipes for the colour zoo models on colour Fashion-MNIST (``ppap zoo train NAME``).

``fashion-rgb-ddpm``: a text-conditional diffusers ``UNet2DConditionModel`` (3x32x32, epsilon
prediction) with cross-attention to a small ``CLIPTextModel`` trained with it, on prompts that name
the image's colour (``ppap.fashion_rgb``), 10% of them empty for classifier-free guidance. It is
trained by the DDPM loop of ``ppap.recipes.train_denoiser`` (seeded, checkpointed, exactly
resumable, EMA) and saved as a ``PPAPPipeline`` folder with ``text_encoder/`` and ``tokenizer/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .fashion_rgb import PROMPT_MAX_LENGTH, PROMPT_TEMPLATES, PROMPT_WORDS, all_prompts, draw_prompts, load_fashion_rgb, tint, to_unit
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
    iterations: int = 6000  # optimiser steps
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
    out_dir: str | Path, work_dir: str | Path, r: TextDDPMRecipe = RGB_DDPM_RECIPE, data_dir=None, stop_after: int | None = None
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
    return train_denoiser(spec, r, out_dir, work_dir, stop_after=stop_after)
