"""Tiny randomly initialised models for fast CPU tests (nothing here needs data or a hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# pytest-xdist (make test: -n auto) runs one test process per core: one thread each, so that the
# processes do not oversubscribe the cores
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

REPO = Path(__file__).resolve().parents[1]

# the device of the device / dtype tests: the CPU here; `make gpu-check` sets PPAP_TEST_DEVICE=cuda
TEST_DEVICE = torch.device(os.environ.get("PPAP_TEST_DEVICE", "cpu"))


def tiny_unet(seed: int = 0, out_channels: int = 1, num_class_embeds: int | None = None, in_channels: int = 1):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()  # as from_pretrained returns it (diffusers' pipelines sample in eval mode)


def tiny_cond_unet(seed: int = 0, out_channels: int = 1, cross_attention_dim: int = 8):
    """A tiny text-conditional UNet2DConditionModel (the GLIDE / DeepFloyd-IF kind)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()


@pytest.fixture
def tiny_diffusion():
    from diffusers import DDPMScheduler

    from ppap import Diffusion, NoiseSchedule

    return Diffusion(tiny_unet(), NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=100)))


@pytest.fixture
def tiny_models(tmp_path, tiny_diffusion):
    """On disk: a diffusers pipeline dir and a tiny classifier's safetensors."""
    from safetensors.torch import save_file

    from ppap.models import tiny_classifier

    ddpm = tmp_path / "ddpm"
    tiny_diffusion.save_pretrained(ddpm)
    torch.manual_seed(1)
    net = tiny_classifier()
    save_file(net.state_dict(), str(tmp_path / "clf.safetensors"))
    return {"diffusion": str(ddpm), "guide": "ppap.models:tiny_classifier", "weights": str(tmp_path / "clf.safetensors"), "root": tmp_path}
