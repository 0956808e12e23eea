"""The diffusion backbone: any pixel-space diffusers UNet plus its noise schedule, in one convention.

Timestep spaces are named, never remapped behind a wrapper:
  * ``t``     training timestep in [0, T): an int, or a float where a scheduler's grid falls
              between the table's entries (Euler / Heun spacings, Karras sigmas); the UNet takes
              it as it is, abar_t is interpolated linearly in log sigma (``NoiseSchedule.abar_at``)
              and an expert bank routes it to the range that contains it;
  * ``i``     sampler step index (0 = first, noisiest step);
  * ``sigma`` noise level sqrt((1 - abar_t) / abar_t).

Whatever the model predicts (``epsilon``, ``v_prediction`` or ``sample``), ``Diffusion`` returns
both the noise and the clean-image estimate (``Prediction``), so samplers and guidance work in
(eps, x0) and never branch on the prediction type.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .frozen import frozen
from .io import PPAPError, give_usual_permissions, read_json
from .router import check_timesteps

SCHEDULER_CONFIG = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
SPACINGS = ("leading", "trailing", "linspace")
SAMPLER_KINDS = ("ddim", "ddpm")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with ``ndim`` dims in total, for broadcasting per-sample scalars."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


@dataclass(frozen=True)
class SamplingGrid:
    """The steps of an S-step sampler exactly as diffusers' scheduler of that kind takes them:
    step i goes from ``timesteps[i]`` (abar_t = ``abar[i]``) to abar_prev = ``abar_prev[i]``."""

    timesteps: Tensor  # [S] descending training timesteps
    abar: Tensor  # [S] float64
    abar_prev: Tensor  # [S] float64; after the last step: 1 (or abar_0 where set_alpha_to_one is off)

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def __getitem__(self, index: slice) -> SamplingGrid:
        return SamplingGrid(self.timesteps[index], self.abar[index], self.abar_prev[index])


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The discrete forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) and the
    diffusers scheduler config it came from (prediction type, spacing, variance, clipping).

    ``alphas_cumprod`` is kept in float64 (holding diffusers' float32 values exactly); values are
    cast to the data dtype only at use, so ppap and diffusers agree bit-for-bit on the table.
    """

    alphas_cumprod: Tensor  # [T] float64, index = training timestep t
    config: dict  # the diffusers scheduler config (for sampling grids, manifests and round-trips)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def prediction_type(self) -> str:
        return self.config.get("prediction_type", "epsilon")

    @property
    def variance_type(self) -> str:
        return self.config.get("variance_type") or "fixed_small"

    @property
    def clip_range(self) -> float | None:
        """|x0| bound of the scheduler's ``clip_sample`` (None: no clipping)."""
        return float(self.config.get("clip_sample_range", 1.0)) if self.config.get("clip_sample", True) else None

    @classmethod
    def from_diffusers(cls, scheduler) -> NoiseSchedule:
        """From any diffusers scheduler instance with ``alphas_cumprod`` (DDPM, DDIM, ...)."""
        config = dict(scheduler.config)
        if config.get("thresholding"):
            raise PPAPError("scheduler option thresholding=True (dynamic thresholding) is not supported; set it to false")
        checks: dict[str, tuple[str, ...]] = {"prediction_type": PREDICTION_TYPES, "timestep_spacing": SPACINGS}
        if config.get("variance_type") is not None:  # None: a scheduler without variance (DPMSolver, ...)
            checks["variance_type"] = VARIANCE_TYPES
        for key, valid in checks.items():
            if key in config and config[key] not in valid:
                raise PPAPError(f"scheduler option {key}={config[key]!r} is not supported; valid: {', '.join(valid)}")
        if not hasattr(scheduler, "alphas_cumprod"):
            raise PPAPError(f"{type(scheduler).__name__} has no alphas_cumprod: ppap needs a DDPM-family scheduler")
        betas = getattr(scheduler, "betas", None)
        if betas is not None and not bool(((betas > 0) & (betas <= 1)).all()):
            bad = betas[~((betas > 0) & (betas <= 1))][0].item()
            raise PPAPError(f"scheduler betas must lie in (0, 1], found {bad:g} (check beta_start / beta_end / trained_betas)")
        return cls(scheduler.alphas_cumprod.to(torch.float64).clone(), config)

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        if not isinstance(config, dict):
            raise PPAPError(f"a scheduler config is a JSON object, got {type(config).__name__}")
        try:
            return cls.from_diffusers(DDPMScheduler.from_config(config))
        except PPAPError:
            raise
        except Exception as e:  # diffusers raises a variety of errors for bad configs
            raise PPAPError(f"bad scheduler config ({e})") from None

    def to_diffusers(self, kind: str = "ddim"):
        """The diffusers scheduler of ``kind`` ("ddim" / "ddpm") with this config."""
        from diffusers import DDIMScheduler, DDPMScheduler

        if kind not in SAMPLER_KINDS:
            raise PPAPError(f"unknown sampler {kind!r}; valid: {', '.join(SAMPLER_KINDS)}")
        return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind].from_config(self.config)

    def check_t(self, t: Tensor) -> None:
        check_timesteps(t, self.num_train_timesteps)

    def abar_at(self, t: Tensor) -> Tensor:
        """abar_t [B] float64 on the CPU at training timesteps t [B] (computed on the CPU: MPS has no
        float64; callers cast, then move). A fractional t is interpolated linearly in log sigma
        between its two neighbours: the inverse of diffusers' ``_sigma_to_t`` (which places Karras
        / exponential sigmas on the timestep axis) and k-diffusion's ``t_to_sigma``."""
        table, t = self.alphas_cumprod, t.detach().cpu()
        if not t.is_floating_point():
            return table[t]
        lo = t.detach().floor().long().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = (t.detach().to(torch.float64) - lo).clamp(0, 1)
        log_sigma = ((1 - table) / table).log() / 2
        sigma = ((1 - w) * log_sigma[lo] + w * log_sigma[hi]).exp()
        return torch.where(w == 0, table[lo], 1 / (1 + sigma**2))  # integer-valued t: the table's own value

    def abar(self, t: Tensor, like: Tensor) -> Tensor:
        """abar_t broadcast to ``like``'s shape, dtype and device: [B] -> [B, 1, 1, 1]. The
        float64 table is indexed on the CPU and cast before it moves (MPS has no float64)."""
        return append_dims(self.abar_at(t).to(like.dtype).to(like.device), like.ndim)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4), same as diffusers ``add_noise``."""
        self.check_t(t)
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def grid(self, num_steps: int, kind: str = "ddim") -> SamplingGrid:
        """The S-step grid diffusers' ``kind`` scheduler would run with this config: its
        ``timestep_spacing`` / ``steps_offset`` for the timesteps; for DDIM the previous step is
        t - T // S (``set_alpha_to_one`` after the end), for DDPM the next timestep in the list."""
        if not isinstance(num_steps, int) or not 1 <= num_steps <= self.num_train_timesteps:
            raise PPAPError(f"number of sampling steps {num_steps} must be in [1, {self.num_train_timesteps}]")
        sched = self.to_diffusers(kind)
        sched.set_timesteps(num_steps)
        ts = sched.timesteps.long()
        self.check_t(ts)
        if kind == "ddim":
            prev, final = ts - self.num_train_timesteps // num_steps, float(sched.final_alpha_cumprod)
        else:
            prev, final = torch.cat([ts[1:], ts.new_tensor([-1])]), 1.0
        table = self.alphas_cumprod
        abar_prev = torch.where(prev >= 0, table[prev.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
        return SamplingGrid(ts, table[ts], abar_prev)

    def to_prediction(self, x_t: Tensor, t: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """(eps, x0) from a model output of this schedule's prediction type, in diffusers' order."""
        return split_output(output, x_t, self.abar(t, x_t), self.prediction_type)


def split_output(output: Tensor, x_t: Tensor, a: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(eps, x0) from a model output [B, C, H, W] of ``prediction_type`` at x_t, abar_t = ``a``
    (broadcastable), in diffusers' order of operations."""
    b = 1 - a
    if prediction_type == "epsilon":
        return output, (x_t - b**0.5 * output) / a**0.5
    if prediction_type == "sample":
        return (x_t - a**0.5 * output) / b**0.5, output
    return a**0.5 * output + b**0.5 * x_t, a**0.5 * x_t - b**0.5 * output  # v = sqrt(abar) eps - sqrt(1 - abar) x0


def join_output(eps: Tensor, x0: Tensor, a: Tensor, prediction_type: str) -> Tensor:
    """The model output of ``prediction_type`` whose (eps, x0) is the given pair (``split_output``'s inverse)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return a**0.5 * eps - (1 - a) ** 0.5 * x0


class Prediction(NamedTuple):
    eps: Tensor  # [B, C, H, W] predicted noise
    x0: Tensor  # [B, C, H, W] predicted clean image (not clipped)
    variance: Tensor | None = None  # [B, C, H, W] the UNet's extra variance channels (learned-variance models)
    output: Tensor | None = None  # [B, C, H, W] the (CFG-combined) model output in its own prediction type


@dataclass(frozen=True)
class Conditioning:
    """What a conditional UNet takes besides (x_t, t), one entry per sample, and classifier-free
    guidance (diffusers' meaning: ``guidance_scale`` 1 = off, eps = eps_u + w (eps_c - eps_u)).

    With ``guidance_scale > 1`` the unconditional branch uses ``negative_prompt_embeds`` (zeros
    when not given; ``PPAPPipeline`` with a text encoder gives the empty prompt's) and ``negative_class_labels`` (the
    model's null class, required when the only condition is a class label)."""

    class_labels: Tensor | None = None  # [B]
    prompt_embeds: Tensor | None = None  # [B, L, D], the UNet's encoder_hidden_states
    negative_prompt_embeds: Tensor | None = None  # [B, L, D]
    negative_class_labels: Tensor | None = None  # [B]
    guidance_scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.guidance_scale, (int, float)) or not torch.isfinite(torch.tensor(float(self.guidance_scale))):
            raise PPAPError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")
        if self.cfg and self.prompt_embeds is None and self.negative_class_labels is None:
            raise PPAPError(
                "classifier-free guidance (guidance_scale > 1) needs prompt_embeds or negative_class_labels (the model's null class)"
            )

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def is_empty(self) -> bool:
        return self.class_labels is None and self.prompt_embeds is None

    def _map(self, fn) -> Conditioning:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)})

    def select(self, index: Tensor | slice) -> Conditioning:
        """The entries of the samples ``index`` (a batch of a longer run)."""
        return self._map(lambda v: v[index])

    def to(self, device: torch.device | str) -> Conditioning:
        return self._map(lambda v: v.to(device))

    def as_kwargs(self) -> dict:
        """The ``PPAPPipeline.__call__`` keyword arguments that rebuild this condition."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Diffusion(nn.Module):
    """A diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``) and its schedule behind one
    call: ``(x_t, t, cond) -> Prediction``. Learned-variance outputs (2C channels) are split into
    the prediction and ``Prediction.variance``. The UNet may run in float16 / bfloat16: inputs are
    cast to its dtype and outputs back to the data's, so the sampler state and guidance stay float32.
    The UNet runs in eval mode with no weight gradients for each call only (``frozen``): the
    caller's UNet (one it is training, say) keeps its own mode and ``requires_grad``."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, name: str = "in-memory", scheduler_config: dict | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.name = name
        self.scheduler_config = scheduler_config  # as saved (its `_class_name` included): load_pipeline rebuilds that class

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg: Any = self.unet.config
        h, w = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        return (cfg.in_channels, int(h), int(w))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def takes_prompt(self) -> bool:
        """Whether the UNet has cross-attention (needs ``encoder_hidden_states``)."""
        config: Any = self.unet.config
        return "cross_attention_dim" in config

    def _unet(self, x: Tensor, t: Tensor, class_labels: Tensor | None, prompt_embeds: Tensor | None) -> Tensor:
        kwargs = {}
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        if self.takes_prompt:
            if prompt_embeds is None:
                raise PPAPError("this UNet is text-conditional (UNet2DConditionModel): pass prompt_embeds")
            kwargs["encoder_hidden_states"] = prompt_embeds.to(self.dtype)
        elif prompt_embeds is not None:
            raise PPAPError(f"prompt_embeds given but {type(self.unet).__name__} takes no encoder_hidden_states")
        with frozen(self.unet):
            return self.unet(x.to(self.dtype), t, **kwargs).sample.to(x.dtype)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Prediction:
        """x_t [B, C, H, W], t [B] (or a scalar) training timesteps."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        cond = cond or Conditioning()
        channels = x_t.shape[1]
        if cond.cfg:
            negative = cond.negative_prompt_embeds
            if cond.prompt_embeds is not None and negative is None:
                negative = torch.zeros_like(cond.prompt_embeds)
            neg_labels = cond.negative_class_labels if cond.negative_class_labels is not None else cond.class_labels
            labels = None if cond.class_labels is None or neg_labels is None else torch.cat([neg_labels, cond.class_labels])
            prompts = None if cond.prompt_embeds is None or negative is None else torch.cat([negative, cond.prompt_embeds])
            uncond, c = self._unet(torch.cat([x_t, x_t]), torch.cat([t, t]), labels, prompts).chunk(2)
            # CFG combines the prediction channels only; a learned variance is the conditional
            # branch's (diffusers' IF pipelines): extrapolated, it could turn negative or leave
            # learned_range's [beta_tilde, beta]
            eps_u, eps_c = uncond[:, :channels], c[:, :channels]
            output = torch.cat([eps_u + cond.guidance_scale * (eps_c - eps_u), c[:, channels:]], dim=1)
        else:
            output = self._unet(x_t, t, cond.class_labels, cond.prompt_embeds)
        variance = output[:, channels:] if output.shape[1] == 2 * channels else None
        eps, x0 = self.schedule.to_prediction(x_t, t, output[:, :channels])
        return Prediction(eps, x0, variance, output[:, :channels])

    def bind(self, cond: Conditioning | None) -> Denoiser:
        """This model with its condition fixed: the ``(x_t, t) -> Prediction`` that samplers take."""
        return Denoiser(self, cond)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
    ) -> Diffusion:
        """Load a diffusers model from a folder or a hub id (``org/name[@revision]``, see
        :mod:`ppap.hub`): a pipeline folder (``unet/`` + ``scheduler/``) or a UNet folder with
        ``scheduler_config.json`` beside its ``config.json``; ``subfolder``: where that sits in the
        folder or repo. ``torch_dtype`` and ``variant`` as in diffusers (``variant="fp16"`` loads
        ``diffusion_pytorch_model.fp16.safetensors``)."""
        from . import hub

        root = Path(path)
        if not root.is_dir():
            if not hub.is_hub_id(str(path)):
                raise hub.not_found(str(path), "diffusion model directory", f"a diffusers folder or {hub.HUB_FORM}")
            root = hub.download_diffusion(str(path), revision=revision, subfolder=subfolder, variant=variant)
        unet_dir, sched_file = hub.diffusers_layout(root, subfolder, str(path))
        if not (unet_dir / "config.json").exists():
            raise PPAPError(f"{path} is not a diffusers UNet directory (no config.json or unet/config.json)")
        if not sched_file.exists():
            raise PPAPError(f"{path} has no scheduler config ({sched_file} missing)")
        saved = read_json(sched_file, "scheduler config")
        schedule = NoiseSchedule.from_config(saved)
        return cls(load_unet(unet_dir, torch_dtype=torch_dtype, variant=variant), schedule, name=str(path), scheduler_config=saved)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a diffusers pipeline directory (loads with ``DDPMPipeline`` / ``PPAPPipeline.from_pretrained``)."""
        from diffusers import DDPMPipeline

        start = time.time() - 1.0  # file times may be coarser than time.time()
        DDPMPipeline(unet=self.unet, scheduler=self.schedule.to_diffusers("ddpm")).save_pretrained(path, safe_serialization=True)
        give_usual_permissions(Path(path), written_since=start)  # safetensors' save_file leaves 0600


@dataclass
class Denoiser:
    """A ``Diffusion`` with its condition bound: ``(x_t, t) -> Prediction`` (k-diffusion's
    "model wrapped once" idea), what samplers and the x0 guides call."""

    diffusion: Diffusion
    cond: Conditioning | None = None

    @property
    def schedule(self) -> NoiseSchedule:
        return self.diffusion.schedule

    def __call__(self, x_t: Tensor, t: Tensor) -> Prediction:
        return self.diffusion(x_t, t, self.cond)

    def select(self, index: Tensor | slice) -> Denoiser:
        """The denoiser of the samples ``index`` (their conditions), for a sub-batch."""
        return self if self.cond is None else Denoiser(self.diffusion, self.cond.select(index))


UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def load_unet(directory: Path, torch_dtype: torch.dtype | None = None, variant: str | None = None) -> nn.Module:
    """A diffusers pixel-space UNet from its folder, of the class its config names."""
    import diffusers

    from .hub import UNET_WEIGHTS, require_safetensors

    name = read_json(directory / "config.json", "UNet config").get("_class_name", "UNet2DModel")
    if name not in UNET_CLASSES:
        raise PPAPError(f"{directory} holds a {name}; ppap takes pixel-space {' or '.join(UNET_CLASSES)}")
    require_safetensors(directory, UNET_WEIGHTS, variant)
    try:
        return getattr(diffusers, name).from_pretrained(directory, use_safetensors=True, torch_dtype=torch_dtype, variant=variant)
    except Exception as e:  # corrupt weights
        raise PPAPError(f"cannot load the UNet in {directory} ({str(e).splitlines()[0][:200]})") from None


def build_conditioning(
    num: int,
    num_classes: int | None,
    *,
    class_labels=None,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    negative_class_labels=None,
    guidance_scale: float = 1.0,
) -> Conditioning | None:
    """The conditions of ``num`` samples (labels cycled, a single prompt embedding repeated), or
    None when nothing conditions; ``num_classes``: the UNet's class embeddings, for the range check."""

    def per_sample(v, name: str, dtype):
        if v is None:
            return None
        v = torch.as_tensor(v, dtype=dtype) if not isinstance(v, Tensor) else v
        v = v.reshape(1) if v.ndim == 0 else v
        if v.shape[0] not in (1, num) and name.endswith("labels"):
            return v[torch.arange(num) % v.shape[0]]
        if v.shape[0] == 1:
            return v.expand((num,) + tuple(v.shape[1:]))
        if v.shape[0] != num:
            raise PPAPError(f"{name} has {v.shape[0]} entries for {num} images (give 1 or {num})")
        return v

    labels = per_sample(class_labels, "class_labels", torch.long)
    neg_labels = per_sample(negative_class_labels, "negative_class_labels", torch.long)
    embeds = per_sample(prompt_embeds, "prompt_embeds", torch.float32)
    negative = per_sample(negative_prompt_embeds, "negative_prompt_embeds", torch.float32)
    for name, lab in (("class_labels", labels), ("negative_class_labels", neg_labels)):
        if lab is not None and num_classes is not None and bool(((lab < 0) | (lab >= num_classes)).any()):
            bad = int(lab[(lab < 0) | (lab >= num_classes)][0])
            raise PPAPError(f"{name} {bad} is out of range: the UNet has {num_classes} class embeddings (0..{num_classes - 1})")
    if embeds is not None and negative is not None and negative.shape != embeds.shape:
        raise PPAPError(f"negative_prompt_embeds {list(negative.shape)} and prompt_embeds {list(embeds.shape)} differ in shape")
    cond = Conditioning(labels, embeds, negative, neg_labels, guidance_scale)
    if cond.is_empty:
        if guidance_scale > 1:
            raise PPAPError("guidance_scale > 1 (classifier-free guidance) needs class_labels or prompt_embeds")
        return None
    return cond
