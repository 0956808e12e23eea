"""Guidance methods: small callables ``guide(x_t, t, pred) -> s * grad_{x_t} log p(target | x_t)``.

The samplers know nothing about tasks, experts or targets; a method is chosen by building a
guide. ``METHODS`` maps the CLI names to builders:

  unguided  no guidance (the builder returns None)
  naive     the off-the-shelf model applied to the noisy x_t as it is
  ppap      the expert bank: the expert owning t, applied to x_t (data-free LoRA experts);
            the same object guides with supervised banks (noise-aware, multi-expert-supervised)
  x0        the off-the-shelf model on the predicted clean image x0_hat(x_t), with the gradient
            back-propagated through the diffusion UNet (Universal Guidance / FreeDoM / DPS style)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import LongTensor, Tensor, nn

from .diffusion import Diffusion, Prediction
from .experts import ExpertBank
from .io import PPAPError
from .tasks import Task


class Guide(Protocol):
    def __call__(self, x_t: Tensor, t: LongTensor, pred: Prediction) -> Tensor: ...


def _grad_log_likelihood(task: Task, output: Tensor, target: Tensor, wrt: Tensor) -> Tensor:
    # Samples are independent (guidance nets run in eval mode), so the gradient of the summed
    # log-likelihood is the per-sample gradient.
    target = task.check_target(target, tuple(output.shape))
    if target.shape[0] != output.shape[0]:
        raise PPAPError(f"{target.shape[0]} targets for a batch of {output.shape[0]} images")
    ll = task.log_likelihood(output, target)
    return torch.autograd.grad(ll.sum(), wrt)[0]


@dataclass
class NoisyInputGuide:
    """grad of log p(target | x_t) from a model applied to x_t directly: ``model(x_t, t)``."""

    model: Callable[[Tensor, LongTensor], Tensor]
    task: Task
    target: Tensor
    scale: float

    def __call__(self, x_t: Tensor, t: LongTensor, pred: Prediction) -> Tensor:
        x = x_t.detach().requires_grad_(True)
        return self.scale * _grad_log_likelihood(self.task, self.model(x, t), self.target, x)


@dataclass
class PredictedX0Guide:
    """grad of log p(target | x0_hat(x_t)) through the diffusion UNet (costs a UNet backward)."""

    diffusion: Diffusion
    net: nn.Module
    task: Task
    target: Tensor
    scale: float

    def __call__(self, x_t: Tensor, t: LongTensor, pred: Prediction) -> Tensor:
        x = x_t.detach().requires_grad_(True)
        x0 = self.diffusion(x, t).x0.clamp(-1, 1)
        return self.scale * _grad_log_likelihood(self.task, self.net(x0), self.target, x)


@dataclass
class NormalizedGuide:
    """Per-sample gradient normalisation: ``scale * g / rms(g)``, so that ``scale`` is a step in
    pixel units at every t (the inner guide's own scale cancels). Robust to experts whose
    gradient magnitude varies by orders of magnitude across noise levels."""

    guide: Guide
    scale: float

    def __call__(self, x_t: Tensor, t: LongTensor, pred: Prediction) -> Tensor:
        g = self.guide(x_t, t, pred)
        rms = g.flatten(1).square().mean(1).sqrt().clamp_min(1e-12)
        return self.scale * g / rms.view(-1, *([1] * (g.ndim - 1)))


@dataclass
class SumGuide:
    """Composed guidance: the sum of several guides' (already scaled) gradients."""

    guides: Sequence[Guide] = field(default_factory=list)

    def __call__(self, x_t: Tensor, t: LongTensor, pred: Prediction) -> Tensor:
        return sum(g(x_t, t, pred) for g in self.guides)


@dataclass
class GuideSpec:
    """Everything a builder may need; each method uses what it needs and checks the rest."""

    task: Task
    target: Tensor
    scale: float
    net: nn.Module | None = None  # the off-the-shelf model, eval mode, input in [-1, 1]
    experts: ExpertBank | None = None
    diffusion: Diffusion | None = None


def _need(spec: GuideSpec, attr: str, method: str):
    value = getattr(spec, attr)
    if value is None:
        flag = {"net": "--guide", "experts": "--experts", "diffusion": "--diffusion"}[attr]
        raise PPAPError(f"method {method!r} needs {flag}")
    return value


def _unguided(spec: GuideSpec) -> None:
    return None


def _naive(spec: GuideSpec) -> Guide:
    net = _need(spec, "net", "naive")
    return NoisyInputGuide(lambda x, t: net(x), spec.task, spec.target, spec.scale)


def _experts(spec: GuideSpec) -> Guide:
    bank = _need(spec, "experts", "ppap").eval()
    return NoisyInputGuide(bank, spec.task, spec.target, spec.scale)


def _x0(spec: GuideSpec) -> Guide:
    return PredictedX0Guide(_need(spec, "diffusion", "x0"), _need(spec, "net", "x0"), spec.task, spec.target, spec.scale)


METHODS: dict[str, Callable[[GuideSpec], Guide | None]] = {
    "unguided": _unguided,
    "naive": _naive,
    "ppap": _experts,
    "x0": _x0,
}


def build_guide(method: str, spec: GuideSpec) -> Guide | None:
    if method not in METHODS:
        raise PPAPError(f"unknown guidance method {method!r}; valid: {', '.join(METHODS)}")
    return METHODS[method](spec)
