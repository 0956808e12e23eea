"""Samplers: each is one readable loop over ``(diffusion, x_T, timesteps)`` with a guidance hook.

A guide is any callable ``guide(x_t, t, pred) -> g`` returning the *scaled* gradient
``s * grad_{x_t} log p(target | x_t)`` ([B, C, H, W]); see ``ppap.guidance``. The samplers apply it
as in Dhariwal & Nichol (2021), "Diffusion Models Beat GANs", Sec. 4:
  * DDIM (Algorithm 2): eps_hat = eps - sqrt(1 - abar_t) * g, and x0 is recomputed from eps_hat;
  * DDPM (Algorithm 1): mu' = mu + Sigma_t * g.
With ``guide=None`` both loops reproduce diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` step for
step (tests/test_samplers.py checks this to 1e-5).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import LongTensor, Tensor
from tqdm.auto import tqdm

from .diffusion import Diffusion, Prediction

GuideFn = Callable[[Tensor, LongTensor, Prediction], Tensor]
Callback = Callable[[dict], None]


def _clip_range(diffusion: Diffusion, clip_x0: bool | None) -> float | None:
    cfg = diffusion.schedule.config
    if cfg.get("thresholding"):
        raise NotImplementedError("dynamic thresholding is not supported; set thresholding=False in the scheduler config")
    clip = cfg.get("clip_sample", True) if clip_x0 is None else clip_x0
    return float(cfg.get("clip_sample_range", 1.0)) if clip else None


def _abars(diffusion: Diffusion, timesteps: LongTensor, i: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(abar_t, abar_prev) of step i as 0-dim tensors in the data's dtype; abar_prev is 1 after
    the last step (diffusers' set_alpha_to_one). The step arithmetic is done in the data's dtype,
    in diffusers' order, so that the loops match diffusers' schedulers to float32 rounding."""
    table = diffusion.schedule.alphas_cumprod
    a_t = table[timesteps[i]].to(like.dtype)
    a_prev = table[timesteps[i + 1]].to(like.dtype) if i + 1 < len(timesteps) else torch.ones((), dtype=like.dtype)
    return a_t.to(like.device), a_prev.to(like.device)


def _guided(diffusion: Diffusion, x: Tensor, t: LongTensor, guide: GuideFn | None) -> tuple[Prediction, Tensor | None]:
    with torch.no_grad():
        pred = diffusion(x, t)
    if guide is None:
        return pred, None
    with torch.enable_grad():
        g = guide(x, t, pred)
    return pred, g.detach()


@torch.no_grad()
def sample_ddim(
    diffusion: Diffusion,
    x_T: Tensor,
    timesteps: LongTensor,
    *,
    guide: GuideFn | None = None,
    eta: float = 0.0,
    clip_x0: bool | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al., 2021, eq. 12). x_T [B, C, H, W] ~ N(0, I); ``timesteps`` descending
    training timesteps (``NoiseSchedule.timesteps``). Returns x_0 [B, C, H, W] (unclipped)."""
    clip = _clip_range(diffusion, clip_x0)
    x = x_T
    for i, t_int in enumerate(tqdm(timesteps.tolist(), desc="DDIM", disable=not progress, leave=False)):
        t = torch.full((x.shape[0],), t_int, dtype=torch.long, device=x.device)
        a_t, a_prev = _abars(diffusion, timesteps, i, x)
        pred, g = _guided(diffusion, x, t, guide)
        eps = pred.eps
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if g is not None:
            # Dhariwal & Nichol eq. 14: eps_hat = eps - sqrt(1 - abar_t) g, and x0 recomputed from
            # eps_hat, i.e. x0 += (1 - abar_t) / sqrt(abar_t) g. Both are applied *after* the x0
            # clip: clipping the guided x0 (but not eps_hat) would cancel the x0 term at high noise
            # and leave only -sqrt(1 - abar_prev) sqrt(1 - abar_t) g, guidance in reverse.
            eps = eps - (1 - a_t) ** 0.5 * g
            x0 = x0 + (1 - a_t) / a_t**0.5 * g
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # sigma_t^2 / eta^2 (eq. 16)
        std = eta * var**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if callback is not None:
            callback({"i": i, "t": t_int, "x": x, "x0": x0, "guidance": g})
    return x


@torch.no_grad()
def sample_ddpm(
    diffusion: Diffusion,
    x_T: Tensor,
    timesteps: LongTensor,
    *,
    guide: GuideFn | None = None,
    clip_x0: bool | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral DDPM (Ho et al., 2020, Algorithm 2) on a possibly respaced grid, with the
    posterior variance ("fixed_small"). Same arguments as ``sample_ddim``."""
    clip = _clip_range(diffusion, clip_x0)
    x = x_T
    for i, t_int in enumerate(tqdm(timesteps.tolist(), desc="DDPM", disable=not progress, leave=False)):
        t = torch.full((x.shape[0],), t_int, dtype=torch.long, device=x.device)
        a_t, a_prev = _abars(diffusion, timesteps, i, x)
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev  # the one-step alpha/beta of the respaced chain
        pred, g = _guided(diffusion, x, t, guide)
        x0 = pred.x0 if clip is None else pred.x0.clamp(-clip, clip)
        # posterior mean of q(x_{t-1} | x_t, x0) (Ho et al. eq. 7)
        mean = (a_prev**0.5 * beta) / (1 - a_t) * x0 + alpha**0.5 * (1 - a_prev) / (1 - a_t) * x
        var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
        if g is not None:  # Dhariwal & Nichol Algorithm 1: mu + s * Sigma * grad
            mean = mean + var * g
        x = mean
        if t_int > 0:
            x = x + var**0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if callback is not None:
            callback({"i": i, "t": t_int, "x": x, "x0": x0, "guidance": g})
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": sample_ddim, "ddpm": sample_ddpm}
