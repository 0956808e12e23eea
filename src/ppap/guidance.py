"""Guidance methods: small callables ``guidance(x_t, t, pred) -> s * grad_{x_t} log p(target | x_t)``.

The guide is the off-the-shelf model; the guidance is the gradient callable built around it (and
its experts). The samplers know nothing about tasks, experts or targets; a method is chosen by
building its guidance. ``METHODS`` maps the CLI names to builders:

  unguided  no guidance (the builder returns None)
  naive     the off-the-shelf model applied to the noisy x_t as it is
  ppap      the expert bank: the expert owning t, applied to x_t (data-free LoRA experts)
  noise-aware, multi-expert-supervised
            the same routed call on a supervised bank (one full copy over all t, or N full
            copies), trained with labels by the same loop (``ppap train --objective supervised``)
  x0        the off-the-shelf model on the predicted clean image x0_hat(x_t), with the gradient
            back-propagated through the diffusion UNet (Universal Guidance / FreeDoM / DPS style)
  x0-shortcut
            the same loss, its gradient taken w.r.t. x0_hat only and mapped to x_t with the
            UNet's Jacobian replaced by the identity (MPGD / EluCD style): no UNet backward.
            ``Calibration`` holds EluCD-style options (temperatures, Softplus, scale schedule).
  best-of-n, fk, tds, ppap-smc, ppap-fk
            particle methods (``ppap.particles``): a term holds their guide, experts, targets
            and lambda; they are sampled with K particles, not by adding a gradient
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from .banks import ExpertBank
from .config import EXPERT_METHODS
from .diffusion import Prediction
from .frozen import frozen
from .io import PPAPError
from .router import check_timestep_range
from .samplers import DenoiserFn, NonFiniteError
from .tasks import Classification, Task


class Guidance(Protocol):
    def __call__(self, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor: ...


def _grad_log_likelihood(task: Task, output: Tensor, target: Tensor, wrt: Tensor) -> Tensor:
    # Samples are independent (guidance nets run in eval mode), so the gradient of the summed
    # log-likelihood is the per-sample gradient.
    target = task.check_target(target, tuple(output.shape))
    if target.shape[0] != output.shape[0]:
        raise PPAPError(f"{target.shape[0]} targets for a batch of {output.shape[0]} images")
    ll = task.log_likelihood(output, target)
    if not bool(torch.isfinite(ll).all()):  # one reduction over [B]: NaN/inf logits or maps of the guide
        raise NonFiniteError("the guidance model's output is not finite")
    return torch.autograd.grad(ll.sum(), wrt)[0]


@dataclass
class NoisyInputGuidance:
    """grad of log p(target | x_t) from a model applied to x_t directly: ``model(x_t, t)``."""

    model: Callable[[Tensor, Tensor], Tensor]
    task: Task
    target: Tensor
    scale: float

    def __call__(self, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
        x = x_t.detach().requires_grad_(True)
        return self.scale * _grad_log_likelihood(self.task, self.model(x, t), self.target, x)


@dataclass
class PredictedX0Guidance:
    """grad of log p(target | x0_hat(x_t)) through the diffusion UNet (costs a UNet backward).

    ``max_batch``: samples per UNet forward and backward (None: the whole batch). The backward
    keeps every activation of the UNet's forward, which at 256x256 is gigabytes per sample; each
    sample's gradient is its own, so sub-batches give the same gradient with a proportionally
    smaller peak."""

    diffusion: DenoiserFn
    net: nn.Module
    task: Task
    target: Tensor
    scale: float
    max_batch: int | None = None

    def __post_init__(self):
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise PPAPError(f"x0 max_batch must be an integer >= 1, got {self.max_batch!r}")

    def __call__(self, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
        return self.guided_prediction(x_t, t)[1]

    def guided_prediction(self, x_t: Tensor, t: Tensor) -> tuple[Prediction, Tensor]:
        """The UNet's prediction and the guidance from ONE forward with grad (samplers use this
        instead of their own no-grad forward), in sub-batches of ``max_batch`` samples. The
        gradient is that of the loss the model sees, on x0_hat clipped to [-1, 1]: zero through
        saturated pixels. (A straight-through clip, which passes it, keeps pushing pixels the clip
        already holds: on segmentation it broke the images at the scales that work,
        docs/findings.md.)"""
        n = x_t.shape[0]
        step = min(self.max_batch or n, n)
        if step == n:
            return self._guided(self.diffusion, x_t, t, self.target)
        parts = [
            self._guided(_rows(self.diffusion, slice(i, i + step)), x_t[i : i + step], t[i : i + step], self.target[i : i + step])
            for i in range(0, n, step)
        ]
        preds = [p for p, _ in parts]
        pred = Prediction._make(None if fields[0] is None else torch.cat(fields) for fields in zip(*preds))
        return pred, torch.cat([g for _, g in parts])

    def _guided(self, denoiser: DenoiserFn, x_t: Tensor, t: Tensor, target: Tensor) -> tuple[Prediction, Tensor]:
        x = x_t.detach().requires_grad_(True)
        pred = denoiser(x, t)
        x0 = pred.x0.clamp(-1, 1)
        g = self.scale * _grad_log_likelihood(self.task, self.net(x0), target, x)
        return Prediction._make(None if v is None else v.detach() for v in pred), g


def _rows(denoiser: DenoiserFn, index: slice) -> DenoiserFn:
    """The denoiser of the samples ``index``: its bound per-sample condition sliced with them."""
    select = getattr(denoiser, "select", None)
    return denoiser if select is None else select(index)


@dataclass(frozen=True)
class Calibration:
    """EluCD-style pre-conditioning of an off-the-shelf classifier for x0-shortcut guidance
    (Ma et al., 2023, "Elucidating the design space of classifier-guided diffusion generation").
    The defaults are the plain, uncalibrated guide."""

    target_temperature: float = 1.0  # log p = z_y / tau_y - logsumexp(z / tau_z): tau_y sharpens the target logit
    norm_temperature: float = 1.0  # tau_z: temperature of the normaliser (tau_y = tau_z: a tempered softmax)
    softplus_beta: float = 0.0  # > 0: every nn.ReLU of the classifier becomes Softplus(beta) (smoother gradients)
    scale_schedule: str = "constant"  # "constant" or "sigma": scale * sqrt(1 - abar_t), fading out as t -> 0

    def __post_init__(self):
        if self.target_temperature <= 0 or self.norm_temperature <= 0:
            raise PPAPError(f"calibration temperatures must be > 0, got {self.target_temperature} and {self.norm_temperature}")
        if self.scale_schedule not in ("constant", "sigma"):
            raise PPAPError(f"unknown scale schedule {self.scale_schedule!r}; valid: 'constant', 'sigma'")

    @classmethod
    def parse(cls, spec: str) -> Calibration:
        """``'target_temperature=0.5,norm_temperature=2,softplus_beta=3,scale_schedule=sigma'``."""
        fields = {f: type(getattr(cls(), f)) for f in cls.__dataclass_fields__}
        values = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = part.partition("=")
            if key not in fields or not value:
                raise PPAPError(f"bad calibration option {part!r}; valid keys: {', '.join(fields)} (as key=value)")
            try:
                values[key] = fields[key](value)
            except ValueError:
                raise PPAPError(f"bad value for calibration option {key}: {value!r}") from None
        return cls(**values)

    def calibrate_net(self, net: nn.Module) -> nn.Module:
        """A copy of ``net`` with its ReLUs swapped for Softplus (the original is untouched)."""
        if self.softplus_beta <= 0:
            return net
        out = copy.deepcopy(net)
        swapped = 0
        for module in out.modules():
            for name, child in module.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(module, name, nn.Softplus(beta=self.softplus_beta))
                    swapped += 1
        if not swapped:
            raise PPAPError("softplus_beta is set but the guidance model has no nn.ReLU modules to replace")
        return out.eval().requires_grad_(False)

    def calibrate_task(self, task: Task) -> Task:
        if (self.target_temperature, self.norm_temperature) == (1.0, 1.0):
            return task
        if not isinstance(task, Classification):
            raise PPAPError(f"calibration temperatures apply to classification, not to {task.name}")
        return CalibratedClassification(
            task.num_classes, task.tau, target_temperature=self.target_temperature, norm_temperature=self.norm_temperature
        )


@dataclass(frozen=True)
class CalibratedClassification(Classification):
    """Classification whose sampling log-likelihood uses separate temperatures on the target
    logit and on the normaliser: z_y / tau_y - logsumexp(z / tau_z)."""

    target_temperature: float = 1.0
    norm_temperature: float = 1.0

    def log_likelihood(self, output: Tensor, target: Tensor) -> Tensor:
        z_y = output.gather(1, target.to(output.device).view(-1, 1))[:, 0]
        return z_y / self.target_temperature - torch.logsumexp(output / self.norm_temperature, dim=1)


@dataclass
class ShortcutX0Guidance:
    """grad of log p(target | x0_hat) w.r.t. x0_hat, mapped to x_t as if d x0_hat / d x_t were
    I / sqrt(abar_t) (the UNet Jacobian dropped): the loss of ``PredictedX0Guidance`` at the cost
    of one classifier forward/backward, no UNet backward (MPGD / EluCD style)."""

    net: nn.Module
    task: Task
    target: Tensor
    scale: float
    diffusion: DenoiserFn
    scale_schedule: str = "constant"

    def __call__(self, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
        x0 = pred.x0.detach().clamp(-1, 1).requires_grad_(True)
        g0 = _grad_log_likelihood(self.task, self.net(x0), self.target, x0)
        abar = self.diffusion.schedule.abar(t, x_t)
        scale = self.scale * ((1 - abar).sqrt() if self.scale_schedule == "sigma" else 1.0)
        return scale * g0 / abar.sqrt()


@dataclass
class NormalizedGuidance:
    """Per-sample gradient normalisation: ``scale * g / rms(g)``, so that ``scale`` is a step in
    pixel units at every t (the inner guide's own scale cancels). Robust to experts whose
    gradient magnitude varies by orders of magnitude across noise levels."""

    inner: Guidance
    scale: float

    def __call__(self, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
        g = self.inner(x_t, t, pred)
        rms = g.flatten(1).square().mean(1).sqrt().clamp_min(1e-12)
        return self.scale * g / rms.view(-1, *([1] * (g.ndim - 1)))


@dataclass
class IntervalGuidance:
    """``guide`` for training timesteps ``lo <= t < hi``, nothing elsewhere: a guidance interval,
    or one piece of a guide assembled per noise range from several terms."""

    inner: Guidance
    lo: int
    hi: int

    def __call__(self, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
        inside = (t >= self.lo) & (t < self.hi)
        if not bool(inside.any()):
            return torch.zeros_like(x_t)
        g = self.inner(x_t, t, pred)
        return g if bool(inside.all()) else g * inside.view(-1, *([1] * (g.ndim - 1))).to(g.dtype)


@dataclass
class SumGuidance:
    """Composed guidance: the sum of several terms' (already scaled) gradients."""

    parts: Sequence[Guidance] = field(default_factory=list)

    def __call__(self, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
        total = torch.zeros_like(x_t)
        for part in self.parts:
            total = total + part(x_t, t, pred)
        return total


@dataclass
class GuidanceSpec:
    """Everything a builder may need; each method uses what it needs and checks the rest."""

    task: Task
    target: Tensor
    scale: float
    net: nn.Module | None = None  # the off-the-shelf model, eval mode, input in [-1, 1]
    experts: ExpertBank | None = None
    diffusion: DenoiserFn | None = None  # the (conditioned) diffusion model, for the x0 methods
    calibration: Calibration = field(default_factory=Calibration)  # x0-shortcut only
    max_batch: int | None = None  # x0 only: samples per UNet forward + backward (None: the whole batch)
    blend: int | None = None  # expert methods only: soft-routing width of the bank's calls (None: the bank's own)


def _need(spec: GuidanceSpec, attr: str, method: str):
    value = getattr(spec, attr)
    if value is None:
        flag = {"net": "--guide", "experts": "--experts", "diffusion": "--diffusion"}[attr]
        raise PPAPError(f"method {method!r} needs {flag}")
    return value


def _unguided(spec: GuidanceSpec) -> None:
    return None


def _naive(spec: GuidanceSpec) -> Guidance:
    net = _need(spec, "net", "naive")
    return NoisyInputGuidance(lambda x, t: net(x), spec.task, spec.target, spec.scale)


def _experts(spec: GuidanceSpec) -> Guidance:
    bank = _need(spec, "experts", "ppap")

    def model(x: Tensor, t: Tensor) -> Tensor:  # blend: the term's routing width; the bank itself unchanged
        if not bank.training:  # the usual case: nothing to switch (frozen's walk over the modules costs ~1 ms)
            return bank(x, t, blend=spec.blend)
        with frozen(bank):  # eval mode for this call only: a bank the caller trains keeps its mode
            return bank(x, t, blend=spec.blend)

    return NoisyInputGuidance(model, spec.task, spec.target, spec.scale)


def _x0(spec: GuidanceSpec) -> Guidance:
    return PredictedX0Guidance(_need(spec, "diffusion", "x0"), _need(spec, "net", "x0"), spec.task, spec.target, spec.scale, spec.max_batch)


def _x0_shortcut(spec: GuidanceSpec) -> Guidance:
    cal = spec.calibration
    return ShortcutX0Guidance(
        cal.calibrate_net(_need(spec, "net", "x0-shortcut")),
        cal.calibrate_task(spec.task),
        spec.target,
        spec.scale,
        _need(spec, "diffusion", "x0-shortcut"),
        cal.scale_schedule,
    )


def _particle_method(spec: GuidanceSpec) -> Guidance | None:
    raise PPAPError(
        "best-of-n, fk, tds, ppap-smc and ppap-fk are particle methods, not a guidance gradient: give particles= (--particles K)"
    )


METHODS: dict[str, Callable[[GuidanceSpec], Guidance | None]] = {
    "unguided": _unguided,
    "naive": _naive,
    "ppap": _experts,
    "noise-aware": _experts,  # a supervised bank with one range: same call, other training
    "multi-expert-supervised": _experts,
    "x0": _x0,
    "x0-shortcut": _x0_shortcut,
    # particle methods (ppap.particles): a term holds their guide, experts, targets and lambda
    "best-of-n": _particle_method,
    "fk": _particle_method,
    "tds": _particle_method,
    "ppap-smc": _particle_method,
    "ppap-fk": _particle_method,
}


def build_guidance(method: str, spec: GuidanceSpec) -> Guidance | None:
    if method not in METHODS:
        raise PPAPError(f"unknown guidance method {method!r}; valid: {', '.join(METHODS)}")
    return METHODS[method](spec)


@dataclass
class GuidanceTerm:
    """One summand of (composed) guidance: a method with its models, task, per-sample targets and
    scale. ``select(index)`` keeps the targets of some samples (a batch of a longer run);
    ``build(denoiser)`` makes the guide the samplers call."""

    method: str
    task: Task
    targets: Tensor  # [N, ...]: one target per sample of the run
    scale: float
    net: nn.Module | None = None  # the off-the-shelf model (a GuideModel)
    experts: ExpertBank | None = None
    calibration: Calibration = field(default_factory=Calibration)
    interval: tuple[int, int] | None = None  # guide only for training timesteps lo <= t < hi
    max_batch: int | None = None  # x0: samples per UNet forward + backward, to cap the backward's memory (exact)
    normalize: bool = False  # per-sample unit-RMS gradient times ``scale`` (``NormalizedGuidance``)
    # expert methods: soft routing of this term's bank calls, the width (timesteps) of the blend of
    # neighbouring experts at each boundary (``ExpertBank.forward``'s ``blend``); None: the bank's own
    blend: int | None = None
    description: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise PPAPError(f"unknown guidance method {self.method!r}; valid: {', '.join(METHODS)}")
        if not math.isfinite(self.scale):
            raise PPAPError(f"guidance scale must be a finite number, got {self.scale}")
        if self.interval is not None:
            check_timestep_range(*self.interval, what="guidance interval")
        if self.blend is not None:
            if not isinstance(self.blend, int) or isinstance(self.blend, bool) or self.blend < 0:
                raise PPAPError(f"guidance blend must be an integer >= 0 (timesteps), got {self.blend!r}")
            if self.method not in EXPERT_METHODS:
                raise PPAPError(f"guidance blend routes an expert bank; method {self.method!r} has none")
        needs = {
            "naive": "net",
            "x0": "net",
            "x0-shortcut": "net",
            "ppap": "experts",
            "noise-aware": "experts",
            "multi-expert-supervised": "experts",
            "best-of-n": "net",
            "fk": "net",
            "tds": "net",
            "ppap-smc": "experts",
            "ppap-fk": "experts",
        }.get(self.method)
        if needs is not None:
            _need(GuidanceSpec(self.task, self.targets, self.scale, net=self.net, experts=self.experts), needs, self.method)

    def select(self, index: Tensor | slice) -> GuidanceTerm:
        return dataclasses.replace(self, targets=self.targets[index])

    def build(self, denoiser: DenoiserFn | None = None) -> Guidance | None:
        spec = GuidanceSpec(
            task=self.task,
            target=self.targets,
            scale=self.scale,
            net=self.net,
            experts=self.experts,
            diffusion=denoiser,
            calibration=self.calibration,
            max_batch=self.max_batch,
            blend=self.blend,
        )
        guidance = build_guidance(self.method, spec)
        if guidance is None:
            return None
        if self.normalize:
            guidance = NormalizedGuidance(guidance, self.scale)
        if self.interval is not None:
            guidance = IntervalGuidance(guidance, *self.interval)
        return guidance


def compose(terms: Sequence[GuidanceTerm], denoiser: DenoiserFn | None = None) -> Guidance | None:
    """The summed guidance of ``terms`` (None when nothing guides)."""
    parts = [g for g in (term.build(denoiser) for term in terms) if g is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else SumGuidance(parts)
