"""Any diffusers scheduler people sample with, guided: one loop in which the guidance corrects
the model output and the scheduler's own ``step`` does the rest (k-diffusion's habit)::

    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_t = scheduler.scale_model_input(x, t)       # the VP sample sqrt(abar) x0 + sqrt(1 - abar) eps
        output = model(x_t, t), guided                # eps_hat = eps - sqrt(1 - abar_t) g
        x = scheduler.step(output, t, x).prev_sample

The correction is Dhariwal & Nichol's (2021, eq. 14), as in ``sample_ddim``: eps_hat = eps -
sqrt(1 - abar_t) g and x0_hat recomputed from eps_hat, with g = s * grad_{x_t} log p(target | x_t)
taken at the VP sample x_t; the pair is turned back into the model's own prediction type
(epsilon, v_prediction or sample) for ``step``. abar_t is the scheduler's own noise level of that
step, 1 / (1 + sigma^2). Unguided, the loop is diffusers' own, bit for bit.

Fractional timesteps (Euler / Heun spacings, Karras sigmas, Heun's second evaluations): the UNet
takes the scheduler's float t as it is; ``Diffusion`` interpolates abar_t linearly in log sigma
for its (eps, x0) and the guides; an expert bank routes t to the range that contains it.

DDIM and DDPM run ppap's own loops (``ppap.samplers``, equal to diffusers' schedulers), whose x0
clipping comes before the guidance correction (a guided DDIM step takes the clipped model output). A learned variance is not passed on: none of the
schedulers here reads it (DPMSolverMultistepScheduler would slice it off itself, assuming 3
image channels; ppap builds it with ``variance_type=None`` instead).
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import torch
from torch import Tensor

from .diffusion import NoiseSchedule, join_output, split_output
from .io import PPAPError
from .samplers import Callback, DenoiserFn, Generator, GuidanceFn, Progress, _check_finite, _number, _step, _steps, sample_ddim, sample_ddpm

# sampler name -> (diffusers scheduler class, config overrides)
SAMPLER_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
OWN_LOOPS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}
GENERIC_SCHEDULERS = tuple(name for name, _ in SAMPLER_NAMES.values() if name not in OWN_LOOPS)
UNSUPPORTED_OPTIONS = {"use_flow_sigmas": True, "timestep_type": "continuous"}  # not the discrete DDPM chain's t


def sampling_scheduler(scheduler, sampler: str | None = None, num_steps: int | None = None):
    """A fresh scheduler for one run (the caller's object is never changed): of the class
    ``sampler`` names, built from ``scheduler``'s config (diffusers' ``Cls.from_config(
    pipe.scheduler.config)``), or with ``sampler`` None of ``scheduler``'s own class. A one-line
    PPAPError for an unknown name, a class ppap cannot guide, an unsupported option or a step
    count outside [1, T]."""
    overrides: dict[str, Any] = {}
    if sampler is None:
        cls = type(scheduler)
    elif sampler not in SAMPLER_NAMES:
        raise PPAPError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLER_NAMES)}")
    else:
        class_name, overrides = SAMPLER_NAMES[sampler]
        cls = getattr(diffusers, class_name)
    if cls.__name__ not in OWN_LOOPS and cls.__name__ not in GENERIC_SCHEDULERS:
        raise PPAPError(
            f"{cls.__name__} cannot be guided by ppap (it needs a DDPM-family scheduler with alphas_cumprod); "
            f"pass sampler= one of {', '.join(SAMPLER_NAMES)}"
        )
    if cls.__name__ == "DPMSolverMultistepScheduler":  # ppap passes the prediction channels only: no [:, :3] slice
        overrides = {**overrides, "variance_type": None}
    try:
        fresh = cls.from_config(scheduler.config, **overrides)
    except (ValueError, TypeError) as e:  # diffusers refuses some option combinations at construction
        raise PPAPError(f"cannot build {cls.__name__} from the scheduler config ({e})") from None
    for key, value in UNSUPPORTED_OPTIONS.items():
        if fresh.config.get(key) == value:
            raise PPAPError(f"{cls.__name__} option {key}={value!r} is not supported: ppap guides the discrete DDPM chain")
    try:
        schedule = NoiseSchedule.from_diffusers(fresh)  # prediction type, spacing, thresholding, betas
    except PPAPError as e:
        raise PPAPError(f"{cls.__name__}: {e}") from None
    if num_steps is not None and (not isinstance(num_steps, int) or not 1 <= num_steps <= schedule.num_train_timesteps):
        raise PPAPError(f"number of sampling steps {num_steps} must be in [1, {schedule.num_train_timesteps}]")
    return fresh


@torch.no_grad()
def sample_scheduler(
    denoiser: DenoiserFn,
    x_T: Tensor,
    scheduler,
    num_steps: int,
    *,
    guidance: GuidanceFn | None = None,
    generator: Generator = None,
    callback: Callback | None = None,
    progress: Progress = False,
) -> Tensor:
    """Sample with a diffusers scheduler of ``GENERIC_SCHEDULERS`` (DPM-Solver(++), UniPC, Euler,
    Euler ancestral, Heun; its config as given): x_T [B, C, H, W] ~ N(0, I), scaled here by the
    scheduler's ``init_noise_sigma``. A fresh copy of ``scheduler`` runs. Returns x_0 [B, C, H, W].
    ``callback`` gets {i, t, x, x0, guidance} after each model evaluation (2 per Heun step)."""
    s = sampling_scheduler(scheduler, None, num_steps)
    if type(s).__name__ not in GENERIC_SCHEDULERS:
        raise PPAPError(f"sample_scheduler takes one of {', '.join(GENERIC_SCHEDULERS)}; {type(s).__name__} runs ppap's own loop")
    s.set_timesteps(num_steps, device=x_T.device)
    kind = s.config.prediction_type
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(s.step).parameters else {}
    x = x_T * s.init_noise_sigma
    for i, t in enumerate(_steps(list(s.timesteps), progress, type(s).__name__)):
        # step i's model input has noise level sigmas[i]: these schedulers start at index 0 and
        # advance one sigma per step() call (Heun's sigmas are interleaved like its timesteps)
        a = (1 / (1 + s.sigmas[i].double() ** 2)).to(x.dtype).to(x.device)  # cast before moving: MPS has no float64
        x_t = s.scale_model_input(x, t)
        pred, g = _step(denoiser, x_t, t, guidance)
        output = pred.output if pred.output is not None else join_output(pred.eps, pred.x0, a, kind)
        eps, x0 = split_output(output, x_t, a, kind)
        if g is not None:  # Dhariwal & Nichol eq. 14, then back to the model's prediction type for step()
            eps = eps - (1 - a) ** 0.5 * g
            x0 = (x_t - (1 - a) ** 0.5 * eps) / a**0.5
            output = join_output(eps, x0, a, kind)
        x = s.step(output, t, x, **step_kwargs).prev_sample
        _check_finite(x, _number(t))
        if callback is not None:  # a callback may return a replacement sample tensor (diffusers' callback_on_step_end)
            replaced = callback({"i": i, "t": _number(t), "x": x, "x0": x0, "guidance": g})
            x = replaced if isinstance(replaced, Tensor) else x
    return x


def sample(
    denoiser: DenoiserFn,
    x_T: Tensor,
    scheduler,
    num_steps: int,
    *,
    guidance: GuidanceFn | None = None,
    eta: float = 0.0,
    use_clipped_model_output: bool | None = None,
    generator: Generator = None,
    callback: Callback | None = None,
    progress: Progress = False,
) -> Tensor:
    """Sample with any scheduler ``sampling_scheduler`` accepts: DDIMScheduler / DDPMScheduler
    through ``sample_ddim`` (with ``eta`` and ``use_clipped_model_output``) / ``sample_ddpm``, the
    others through ``sample_scheduler``."""
    own = OWN_LOOPS.get(type(scheduler).__name__)
    if own is None:
        return sample_scheduler(
            denoiser, x_T, scheduler, num_steps, guidance=guidance, generator=generator, callback=callback, progress=progress
        )
    grid = NoiseSchedule.from_diffusers(scheduler).grid(num_steps, own)
    if own == "ddim":
        return sample_ddim(
            denoiser,
            x_T,
            grid,
            guidance=guidance,
            eta=eta,
            use_clipped_model_output=use_clipped_model_output,
            generator=generator,
            callback=callback,
            progress=progress,
        )
    return sample_ddpm(denoiser, x_T, grid, guidance=guidance, generator=generator, callback=callback, progress=progress)
