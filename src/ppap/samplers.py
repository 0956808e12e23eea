"""Samplers: each is one readable loop over ``(denoiser, x_T, grid)`` with a guidance hook.

``denoiser(x_t, t) -> Prediction`` is a ``Diffusion`` (or one with its condition bound,
``Diffusion.bind``); ``grid`` is ``NoiseSchedule.grid(S, kind)``, the steps diffusers' scheduler
of that kind would take. The guidance is any callable ``guidance(x_t, t, pred) -> g`` returning the
*scaled* gradient ``s * grad_{x_t} log p(target | x_t)`` ([B, C, H, W]); see ``ppap.guidance``.
The samplers apply it as in Dhariwal & Nichol (2021), "Diffusion Models Beat GANs", Sec. 4:
  * DDIM (Algorithm 2): eps_hat = eps - sqrt(1 - abar_t) * g, and x0 is recomputed from eps_hat;
  * DDPM (Algorithm 1): mu' = mu + Sigma_t * g.
Working in (eps, x0) makes this the same correction whatever the model predicts (eps, v or x0).
With ``guidance=None`` both loops reproduce diffusers' ``DDIMScheduler`` / ``DDPMScheduler``
step for step, noise included (``randn_tensor`` with the caller's generator or generator list).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm.auto import tqdm

from .diffusion import NoiseSchedule, Prediction, SamplingGrid
from .io import PPAPError


class NonFiniteError(PPAPError):
    """A NaN or inf in guidance or sampling (the pipeline adds which guidance method)."""


GuidanceFn = Callable[[Tensor, Tensor, Prediction], Tensor]
Callback = Callable[[dict], Tensor | None]  # may return a replacement sample
Generator = torch.Generator | list[torch.Generator] | None
Progress = bool | Callable[[list[int]], Iterable[int]]
"""``True`` / ``False``: a tqdm bar of the sampler's own, or none; a callable wraps the list of
timesteps (a pipeline passes its ``progress_bar``, so that ``set_progress_bar_config`` applies)."""


class DenoiserFn(Protocol):
    @property
    def schedule(self) -> NoiseSchedule: ...

    def __call__(self, x_t: Tensor, t: Tensor) -> Prediction: ...


def _clip_range(schedule: NoiseSchedule, clip_x0: bool | None) -> float | None:
    if clip_x0 is None:
        return schedule.clip_range
    return float(schedule.config.get("clip_sample_range", 1.0)) if clip_x0 else None


def _step(denoiser: DenoiserFn, x: Tensor, timestep: int | Tensor, guidance: GuidanceFn | None) -> tuple[Prediction, Tensor | None]:
    """The prediction at (x, t) and the guidance gradient (None unguided). ``timestep`` is an int
    or a scheduler's 0-dim timestep (kept in its dtype: a float t reaches the UNet as it is)."""
    if isinstance(timestep, Tensor):
        t, t_int = timestep.to(x.device).expand(x.shape[0]).contiguous(), _number(timestep)
    else:
        t, t_int = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device), timestep
    if guidance is not None and hasattr(guidance, "guided_prediction"):  # guidance that needs the UNet forward with grad
        with torch.enable_grad():
            pred, g = guidance.guided_prediction(x, t)
    else:
        with torch.no_grad():
            pred = denoiser(x, t)
        if guidance is None:
            return pred, None
        with torch.enable_grad():
            g = guidance(x, t, pred)
    if not bool(torch.isfinite(g).all()):
        raise NonFiniteError(f"the guidance gradient is not finite at t={t_int:g}")
    return pred, g.detach()


def _number(t: Tensor) -> int | float:
    """A scheduler's 0-dim timestep as a Python number (an int where it is one)."""
    value = float(t)
    return int(value) if value.is_integer() else value


def _check_finite(x: Tensor, t_int: int | float) -> None:
    """One reduction per step: a NaN/inf sample is an error now, never an all-black image later."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"the sample became non-finite at t={t_int:g} (the diffusion model's output or the guidance scale)")


def _steps(timesteps: list, progress: Progress, desc: str) -> Iterable:
    """The loop's timesteps, through the caller's progress wrapper or a tqdm bar."""
    if callable(progress):
        return progress(timesteps)
    return tqdm(timesteps, desc=desc, disable=not progress, leave=False)


def _scalars(grid: SamplingGrid, i: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(abar_t, abar_prev) of step i as 0-dim tensors in the data's dtype and device: the step
    arithmetic runs in that dtype, in diffusers' order, so that the loops match its schedulers.
    The float64 grid is cast before it moves (MPS has no float64)."""
    return grid.abar[i].to(like.dtype).to(like.device), grid.abar_prev[i].to(like.dtype).to(like.device)


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    x_T: Tensor,
    grid: SamplingGrid,
    *,
    guidance: GuidanceFn | None = None,
    eta: float = 0.0,
    clip_x0: bool | None = None,
    use_clipped_model_output: bool | None = None,
    generator: Generator = None,
    callback: Callback | None = None,
    progress: Progress = False,
) -> Tensor:
    """DDIM (Song et al., 2021, eq. 12). x_T [B, C, H, W] ~ N(0, I); ``grid`` from
    ``schedule.grid(S, "ddim")``. ``clip_x0`` None follows the scheduler's ``clip_sample``.
    ``use_clipped_model_output`` (diffusers' ``DDIMScheduler.step`` option): with clipping, step
    with eps re-derived from the clipped x0; None: in guided steps (as guided-diffusion's DDIM,
    which the official PPAP code guides), not in unguided ones (diffusers' default).
    Returns x_0 [B, C, H, W] (unclipped)."""
    clip = _clip_range(denoiser.schedule, clip_x0)
    x = x_T
    for i, t_int in enumerate(_steps(grid.timesteps.tolist(), progress, "DDIM")):
        a_t, a_prev = _scalars(grid, i, x)
        pred, g = _step(denoiser, x, t_int, guidance)
        eps, x0 = pred.eps, pred.x0
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            if (g is not None if use_clipped_model_output is None else use_clipped_model_output) and a_t < 1:
                eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        if g is not None:
            # Dhariwal & Nichol eq. 14: eps_hat = eps - sqrt(1 - abar_t) g, and x0 recomputed from
            # eps_hat, i.e. x0 += (1 - abar_t) / sqrt(abar_t) g, from the clipped model output (a
            # raw eps keeps the clipped-off part of x0: stepping the guided pair from it washed out
            # a text prompt's colour). Both are applied *after* the x0 clip: clipping the guided x0
            # would cancel the x0 term at high noise and leave only
            # -sqrt(1 - abar_prev) sqrt(1 - abar_t) g, guidance in reverse.
            # At abar_t = 0 (zero terminal SNR) x0 carries no information about x_t: eps only.
            eps = eps - (1 - a_t) ** 0.5 * g
            if a_t > 0:
                x0 = x0 + (1 - a_t) / a_t**0.5 * g
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # sigma_t^2 / eta^2 (eq. 16)
        std = eta * var**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        _check_finite(x, t_int)
        if callback is not None:  # a callback may return a replacement sample tensor (diffusers' callback_on_step_end)
            replaced = callback({"i": i, "t": t_int, "x": x, "x0": x0, "guidance": g})
            x = replaced if isinstance(replaced, Tensor) else x
    return x


def _ddpm_std_and_var(schedule: NoiseSchedule, pred: Prediction, a_t: Tensor, a_prev: Tensor) -> tuple[Tensor, Tensor]:
    """(std, variance) of the DDPM step from x_t to x_prev, for the scheduler's ``variance_type``,
    computed as diffusers' ``DDPMScheduler._get_variance`` / ``step`` do."""
    beta = 1 - a_t / a_prev
    small = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)  # the posterior variance (Ho et al. eq. 7)
    kind = schedule.variance_type
    learned = pred.variance
    if kind in ("learned", "learned_range") and learned is None:
        raise PPAPError(f"variance_type {kind!r} needs a UNet with 2x the image channels (mean and variance)")
    if kind == "fixed_small":
        return small**0.5, small
    if kind == "fixed_small_log":
        std = torch.exp(0.5 * torch.log(small))
        return std, std**2
    if kind == "fixed_large":
        return beta**0.5, beta
    assert learned is not None
    if kind == "learned":  # diffusers' meaning: the extra channels are the variance itself
        return learned**0.5, learned
    frac = (learned + 1) / 2  # learned_range (Nichol & Dhariwal eq. 15): interpolate log-variances
    log_var = frac * torch.log(beta) + (1 - frac) * torch.log(small)
    return torch.exp(0.5 * log_var), torch.exp(log_var)


@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    x_T: Tensor,
    grid: SamplingGrid,
    *,
    guidance: GuidanceFn | None = None,
    clip_x0: bool | None = None,
    generator: Generator = None,
    callback: Callback | None = None,
    progress: Progress = False,
) -> Tensor:
    """Ancestral DDPM (Ho et al., 2020, Algorithm 2) on a possibly respaced grid (from
    ``schedule.grid(S, "ddpm")``), with the scheduler's variance (fixed or learned). Same
    arguments as ``sample_ddim``."""
    schedule = denoiser.schedule
    clip = _clip_range(schedule, clip_x0)
    x = x_T
    for i, t_int in enumerate(_steps(grid.timesteps.tolist(), progress, "DDPM")):
        a_t, a_prev = _scalars(grid, i, x)
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev  # the one-step alpha/beta of the respaced chain
        pred, g = _step(denoiser, x, t_int, guidance)
        x0 = pred.x0 if clip is None else pred.x0.clamp(-clip, clip)
        # posterior mean of q(x_{t-1} | x_t, x0) (Ho et al. eq. 7)
        mean = (a_prev**0.5 * beta) / (1 - a_t) * x0 + alpha**0.5 * (1 - a_prev) / (1 - a_t) * x
        std, var = _ddpm_std_and_var(schedule, pred, a_t, a_prev)
        if g is not None:  # Dhariwal & Nichol Algorithm 1: mu + s * Sigma * grad
            mean = mean + var * g
        x = mean
        if t_int > 0:
            x = x + std * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        _check_finite(x, t_int)
        if callback is not None:  # a callback may return a replacement sample tensor (diffusers' callback_on_step_end)
            replaced = callback({"i": i, "t": t_int, "x": x, "x0": x0, "guidance": g})
            x = replaced if isinstance(replaced, Tensor) else x
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": sample_ddim, "ddpm": sample_ddpm}
