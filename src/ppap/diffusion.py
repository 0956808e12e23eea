"""The diffusion backbone: a diffusers ``UNet2DModel`` plus its noise schedule, in one convention.

Timestep spaces are named, never remapped behind a wrapper:
  * ``t``     training timestep, int in [0, T) (what the UNet, the router and q_sample take);
  * ``i``     sampler step index (0 = first, noisiest step);
  * ``sigma`` noise level sqrt((1 - abar_t) / abar_t).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import LongTensor, Tensor, nn

from .io import PPAPError, read_json

SCHEDULER_CONFIG = "scheduler_config.json"


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with ``ndim`` dims in total, for broadcasting per-sample scalars."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The discrete forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    ``alphas_cumprod`` is kept in float64 (the 1000-step products lose digits in float32); values
    are cast to the data dtype only at use. Build it from a diffusers scheduler so that ppap and
    diffusers agree bit-for-bit on the table.
    """

    alphas_cumprod: Tensor  # [T] float64, index = training timestep t
    config: dict  # the diffusers scheduler config it came from (for manifests and round-trips)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_diffusers(cls, scheduler) -> "NoiseSchedule":
        """From any diffusers scheduler instance with ``alphas_cumprod`` (DDPM, DDIM, ...)."""
        pred = scheduler.config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise PPAPError(f"prediction_type {pred!r} is not supported yet (ppap needs an epsilon-prediction model)")
        return cls(scheduler.alphas_cumprod.to(torch.float64).clone(), dict(scheduler.config))

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        from diffusers import DDPMScheduler

        try:
            return cls.from_diffusers(DDPMScheduler.from_config(config))
        except PPAPError:
            raise
        except Exception as e:  # diffusers raises a variety of errors for bad configs
            raise PPAPError(f"bad scheduler config ({e})") from None

    def to_diffusers(self, kind: str = "ddim"):
        from diffusers import DDIMScheduler, DDPMScheduler

        return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind].from_config(self.config)

    def check_t(self, t: Tensor) -> None:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise PPAPError(f"timestep {bad} is outside [0, {self.num_train_timesteps})")

    def abar(self, t: LongTensor, like: Tensor) -> Tensor:
        """abar_t broadcast to ``like``'s shape and dtype: [B] -> [B, 1, 1, 1]."""
        a = self.alphas_cumprod.to(like.device)[t.to(like.device)]
        return append_dims(a, like.ndim).to(like.dtype)

    def sigma(self, t: LongTensor) -> Tensor:
        a = self.alphas_cumprod[t]
        return ((1 - a) / a).sqrt()

    def q_sample(self, x0: Tensor, t: LongTensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4), same as diffusers ``add_noise``."""
        self.check_t(t)
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def timesteps(self, num_steps: int, spacing: str = "leading") -> LongTensor:
        """Descending training timesteps for an S-step sampler, as diffusers' DDIM spaces them."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise PPAPError(f"number of sampling steps {num_steps} must be in [1, {self.num_train_timesteps}]")
        sched = self.to_diffusers("ddim")
        sched.register_to_config(timestep_spacing=spacing)
        sched.set_timesteps(num_steps)
        return sched.timesteps.long()

    def eps_to_x0(self, x_t: Tensor, t: LongTensor, eps: Tensor) -> Tensor:
        a = self.abar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def x0_to_eps(self, x_t: Tensor, t: LongTensor, x0: Tensor) -> Tensor:
        a = self.abar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


class Prediction(NamedTuple):
    eps: Tensor  # [B, C, H, W] predicted noise
    x0: Tensor  # [B, C, H, W] predicted clean image (not clipped)


class Diffusion(nn.Module):
    """An epsilon-prediction UNet and its schedule behind one call: ``(x_t, t) -> Prediction``.

    ``unet`` is a diffusers ``UNet2DModel`` (or anything with its call signature returning
    ``.sample``); learned-variance outputs (2C channels) are cut to the first C (the epsilon).
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, name: str = "in-memory"):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.schedule = schedule
        self.name = name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def forward(self, x_t: Tensor, t: LongTensor) -> Prediction:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        eps = self.unet(x_t, t).sample[:, : x_t.shape[1]]
        return Prediction(eps, self.schedule.eps_to_x0(x_t, t, eps))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Diffusion":
        """Load a diffusers directory: a pipeline folder (``unet/`` + ``scheduler/``) or a UNet
        folder with ``scheduler_config.json`` beside its ``config.json``."""
        from diffusers import UNet2DModel

        root = Path(path)
        if not root.is_dir():
            raise PPAPError(f"diffusion model directory not found: {root}")
        unet_dir, sched_file = (root / "unet", root / "scheduler" / SCHEDULER_CONFIG) if (root / "unet").is_dir() \
            else (root, root / SCHEDULER_CONFIG)
        if not (unet_dir / "config.json").exists():
            raise PPAPError(f"{root} is not a diffusers UNet2DModel directory (no config.json or unet/config.json)")
        if not sched_file.exists():
            raise PPAPError(f"{root} has no scheduler config ({sched_file} missing)")
        schedule = NoiseSchedule.from_config(read_json(sched_file, "scheduler config"))
        try:
            unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)
        except Exception as e:  # corrupt weights, wrong class, missing safetensors
            raise PPAPError(f"cannot load the UNet in {unet_dir} ({str(e).splitlines()[0][:200]})") from None
        return cls(unet, schedule, name=str(root))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a diffusers ``DDPMPipeline`` directory (loads with ``DDPMPipeline.from_pretrained``)."""
        from diffusers import DDPMPipeline

        DDPMPipeline(unet=self.unet, scheduler=self.schedule.to_diffusers("ddpm")).save_pretrained(path, safe_serialization=True)
