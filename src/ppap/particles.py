"""Particle methods: sampling from p(x) p(y | x)^lambda with K particles per requested image.

One loop (``sample_smc``) on the ancestral chain, DDPM (``kind="ddpm"``) or DDIM with eta > 0,
whose base step is the Gaussian p(x_{t-1} | x_t) = N(mu, sigma_t^2). A *twist* gives, at each
x_t, the UNet's prediction, log p~_t(y | x_t) (lambda included) and, for a twisted proposal, its
gradient. The methods differ only in the twist, the proposal and the final pick:

  best-of-n  no twist, no resampling; keep the particle with the highest lambda log p(y | x_0)
  fk         Feynman-Kac steering (Singhal et al. 2025), the "diff" potential: log G_t = lambda
             (r_t - r_{t+1}), r_t = log p(y | x0_hat(x_t)) by the clean classifier; proposal =
             the base step; resampling when ESS < K/2; final: the best particle by log p(y | x_0)
  tds        the Twisted Diffusion Sampler (Wu et al. 2023): twist lambda log p(y | x0_hat(x_t)),
             proposal N(mu + sigma_t^2 grad log p~_t, sigma_t^2) (the gradient through the UNet)
  ppap-smc   TDS with the routed PPAP expert as the twist, gamma_t log expert_t(y | x_t), and its
             gradient w.r.t. x_t as the proposal's shift: no UNet backward. The exponent is
             annealed, gamma_t = 1 + (lambda - 1) abar_t: lambda on clean images, 1 at high noise,
             since the ideal twist E[p(y | x_0)^lambda | x_t] is far flatter than
             E[p(y | x_0) | x_t]^lambda there (an x_t whose image becomes the class half the time
             has an ideal twist near 1/2, where the expert's lambda-th power gives 2^-lambda)
  ppap-fk    FK steering with the expert as the potential: r_t = log expert_t(y | x_t) on x_t
             itself (no x0 prediction, no backward anywhere); otherwise as fk

For the twisted methods the incremental log-weight of a step is
    log p(x_{t-1} | x_t) - log q(x_{t-1} | x_t, y) + log p~_{t-1}(y | x_{t-1}) - log p~_t(y | x_t)
(p~_{t-1} by the twist that owns t-1: an expert switch at a router boundary is accounted for),
the first weight is p~_T(y | x_T), and the last twist is the clean classifier on x_0, lambda log
p(y | x_0): whatever the twist's errors, the weighted particles target p(x) p(y | x)^lambda. TDS
and ppap-smc return one particle per image drawn by the final weights (with K = 1, their
proposal's sampler on the DDPM chain: x0 guidance at scale lambda, PPAP guidance at scale gamma_t).

All B * K particles run in one batch (image-major: image b's particles are rows bK..bK+K-1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .banks import ExpertBank
from .diffusion import NoiseSchedule, Prediction, SamplingGrid
from .io import PPAPError
from .samplers import DenoiserFn, Generator, NonFiniteError, Progress, _check_finite, _clip_range, _ddpm_std_and_var, _scalars, _steps
from .schedulers import OWN_LOOPS
from .smc import draw_one, effective_sample_size, flat_index, normalize_log_weights, shifted_gaussian_log_ratio, systematic_resample
from .tasks import Task

TwistOutput = tuple[Prediction, Tensor, Tensor | None]  # (prediction, log p~_t [N], its gradient [N, C, H, W] or None)
Probe = Callable[[Tensor, Tensor, Prediction], dict[str, Tensor]]  # (x_t, t, pred) -> {name: [N] values}, followed along resampling


def _log_likelihood(task: Task, output: Tensor, target: Tensor) -> Tensor:
    ll = task.log_likelihood(output, target)
    if not bool(torch.isfinite(ll).all()):
        raise NonFiniteError("the guidance model's output is not finite")
    return ll


def _predict(denoiser: DenoiserFn, x: Tensor, t: Tensor) -> Prediction:
    with torch.no_grad():
        return denoiser(x, t)


@dataclass
class CleanReward:
    """lambda log p(y | x) by the clean classifier on x clipped to [-1, 1] -> [N]."""

    net: Callable[[Tensor], Tensor]  # images in [-1, 1] -> logits
    task: Task
    target: Tensor  # [N], one per particle
    scale: float

    def __call__(self, x: Tensor) -> Tensor:
        return self.scale * _log_likelihood(self.task, self.net(x.clamp(-1, 1)), self.target)


@dataclass
class NoTwist:
    """best-of-n: the base model alone (log p~ = 0, no gradient)."""

    denoiser: DenoiserFn

    def __call__(self, x: Tensor, t: Tensor) -> TwistOutput:
        pred = _predict(self.denoiser, x, t)
        return pred, x.new_zeros(x.shape[0]), None


@dataclass
class X0Twist:
    """log p~_t(y | x_t) = lambda log p(y | x0_hat(x_t)): the clean classifier on the predicted
    clean image. ``gradient``: also its gradient w.r.t. x_t, through the UNet (one UNet backward)."""

    denoiser: DenoiserFn
    reward: CleanReward
    gradient: bool = False

    def __call__(self, x: Tensor, t: Tensor) -> TwistOutput:
        if not self.gradient:
            pred = _predict(self.denoiser, x, t)
            with torch.no_grad():
                return pred, self.reward(pred.x0), None
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            pred = self.denoiser(x, t)
            log_twist = self.reward(pred.x0)
            grad = torch.autograd.grad(log_twist.sum(), x)[0]
        return Prediction._make(None if v is None else v.detach() for v in pred), log_twist.detach(), grad


@dataclass
class ExpertTwist:
    """log p~_t(y | x_t) = gamma_t log expert_t(y | x_t), the expert owning t applied to x_t, and
    (``gradient``) its gradient w.r.t. x_t through the expert only (the UNet runs without grad).
    gamma_t = ``scale`` (lambda), or with ``alphas_cumprod`` [T] the annealed exponent
    1 + (lambda - 1) abar_t."""

    denoiser: DenoiserFn
    bank: ExpertBank | Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> logits of the expert owning t
    task: Task
    target: Tensor  # [N]
    scale: float
    gradient: bool = True
    alphas_cumprod: Tensor | None = None

    def exponent(self, t: Tensor) -> Tensor:
        """gamma_t [N] of each particle's timestep."""
        if self.alphas_cumprod is None:
            return torch.full(t.shape, self.scale, dtype=torch.float32, device=t.device)
        return (1 + (self.scale - 1) * self.alphas_cumprod.to(t.device)[t]).float()

    def __call__(self, x: Tensor, t: Tensor) -> TwistOutput:
        pred = _predict(self.denoiser, x, t)
        gamma = self.exponent(t).to(x.device)
        if not self.gradient:
            with torch.no_grad():
                return pred, gamma * _log_likelihood(self.task, self.bank(x, t), self.target), None
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_twist = gamma * _log_likelihood(self.task, self.bank(x, t), self.target)
            grad = torch.autograd.grad(log_twist.sum(), x)[0]
        return pred, log_twist.detach(), grad


Twist = Callable[[Tensor, Tensor], TwistOutput]


@dataclass(frozen=True)
class ParticleMethod:
    twist: str  # "none", "x0" (value only), "x0-grad" (value and gradient through the UNet), "experts" (value only), "experts-grad"
    resample: bool
    pick: str  # "best": the highest final reward; "sample": one particle drawn by the final weights
    needs: str  # what the method needs besides the guide: "" or "experts"
    anneal: bool = False  # the expert twist's exponent: 1 + (lambda - 1) abar_t, not lambda (``ExpertTwist``)


PARTICLE_SPECS: dict[str, ParticleMethod] = {
    "best-of-n": ParticleMethod("none", resample=False, pick="best", needs=""),
    "fk": ParticleMethod("x0", resample=True, pick="best", needs=""),
    "tds": ParticleMethod("x0-grad", resample=True, pick="sample", needs=""),
    "ppap-smc": ParticleMethod("experts-grad", resample=True, pick="sample", needs="experts", anneal=True),
    "ppap-fk": ParticleMethod("experts", resample=True, pick="best", needs="experts"),
}


@dataclass
class SMCResult:
    """The returned samples and what the run went through (B images, K particles, S steps)."""

    images: Tensor  # [B, C, H, W]: one particle per image
    particles: Tensor  # [B * K, C, H, W]: every final particle
    log_weights: Tensor  # [B, K] final normalised log-weights
    chosen: Tensor  # [B] index (within its image's K) of the returned particle
    ess: Tensor  # [S, B] effective sample size before each step's resampling decision
    resampled: Tensor  # [S, B] bool: resampled at that step
    timesteps: list  # [S] the step's t
    log_evidence: Tensor  # [B] the SMC estimate of log E_p[p(y | x_0)^lambda] (its exponential is unbiased)
    probes: dict[str, Tensor] = field(default_factory=dict)  # name -> [S, B * K], each final particle's ancestors' values


def particle_noise(num: int, particles: int, shape: tuple[int, ...], generator: Generator, device, dtype=torch.float32) -> Tensor:
    """Standard normal noise [num * particles, *shape]; with one generator per image, image b's K
    draws come from generator b (with K = 1 exactly what ``randn_tensor`` draws for the batch)."""
    if isinstance(generator, list):
        return torch.cat([randn_tensor((particles,) + shape, generator=g, device=device, dtype=dtype) for g in generator])
    return randn_tensor((num * particles,) + shape, generator=generator, device=device, dtype=dtype)


def _base_step(denoiser: DenoiserFn, pred: Prediction, x: Tensor, grid: SamplingGrid, i: int, kind: str, eta: float, clip):
    """(mean, std, noisy) of the base step p(x_{t-1} | x_t) = N(mean, std^2), computed as
    ``sample_ddpm`` / ``sample_ddim`` compute theirs (noisy: whether that loop adds noise)."""
    a_t, a_prev = _scalars(grid, i, x)
    x0 = pred.x0 if clip is None else pred.x0.clamp(-clip, clip)
    if kind == "ddpm":
        beta = 1 - a_t / a_prev
        mean = (a_prev**0.5 * beta) / (1 - a_t) * x0 + (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t) * x
        std, _ = _ddpm_std_and_var(denoiser.schedule, pred, a_t, a_prev)
        return mean, std, int(grid.timesteps[i]) > 0
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    return a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * pred.eps, std, eta > 0


class ParticleState(NamedTuple):
    """The particles at x_t and what the twist said there (rows: particles)."""

    x: Tensor  # [N, C, H, W]
    pred: Prediction  # the UNet's prediction at (x_t, t)
    log_twist: Tensor  # [N] log p~_t(y | x_t), float64 on the CPU
    grad: Tensor | None  # [N, C, H, W] its gradient w.r.t. x_t (None: the proposal is the base step)

    def select(self, index: Tensor) -> ParticleState:
        """The particles ``index`` [N'] (flat indices: resampling)."""
        at = index.to(self.x.device)
        pred = Prediction._make(None if v is None else v[at] for v in self.pred)
        return ParticleState(self.x[at], pred, self.log_twist[index], None if self.grad is None else self.grad[at])


def start(twist: Twist, x_T: Tensor, t: int) -> ParticleState:
    """The state at x_T: the twist at the first timestep t."""
    pred, log_twist, grad = twist(x_T, torch.full((x_T.shape[0],), t, dtype=torch.long, device=x_T.device))
    return ParticleState(x_T, pred, log_twist.double().cpu(), grad)  # weights in float64 on the CPU (MPS has none)


def smc_step(
    denoiser: DenoiserFn,
    grid: SamplingGrid,
    i: int,
    state: ParticleState,
    twist: Twist,
    reward: Callable[[Tensor], Tensor],
    *,
    kind: str = "ddpm",
    eta: float = 1.0,
    clip_x0: bool | None = None,
    generator: Generator = None,
) -> tuple[ParticleState, Tensor]:
    """Step i of the grid, x_t -> x_{t-1}, for every particle: x_{t-1} ~ q = N(mean + sigma_t^2 grad,
    sigma_t^2) (the base step where ``state.grad`` is None), then the twist at t-1 (after the last
    step: ``reward(x_0)``). Returns the new state and the incremental log-weight [N] (float64)
    log p(x_{t-1} | x_t) - log q(x_{t-1} | x_t, y) + log p~_{t-1}(y | x_{t-1}) - log p~_t(y | x_t).
    ``generator``: one, or one per particle; ``clip_x0`` as in ``sample_ddpm``."""
    x, t_int = state.x, int(grid.timesteps[i])
    mean, std, noisy = _base_step(denoiser, state.pred, x, grid, i, kind, eta, _clip_range(denoiser.schedule, clip_x0))
    shift = None if state.grad is None else std**2 * state.grad
    proposal = mean if shift is None else mean + shift
    x_new = proposal
    if noisy:
        x_new = proposal + std * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    _check_finite(x_new, t_int)
    log_ratio = torch.zeros_like(state.log_twist)  # log p(x_{t-1} | x_t) - log q(x_{t-1} | x_t, y): 0 for the base step
    if shift is not None and noisy and bool((std > 0).all()):  # (a step without noise is the same map under p and q)
        log_ratio = shifted_gaussian_log_ratio(x_new, proposal, shift, std**2).double().cpu()
    if i + 1 < len(grid):
        pred, new_twist, grad = twist(x_new, torch.full((x.shape[0],), int(grid.timesteps[i + 1]), dtype=torch.long, device=x.device))
    else:
        pred, new_twist, grad = state.pred, reward(x_new), None
    new = ParticleState(x_new, pred, new_twist.double().cpu(), grad)
    return new, log_ratio + new.log_twist - state.log_twist


@torch.no_grad()
def sample_smc(
    denoiser: DenoiserFn,
    x_T: Tensor,
    grid: SamplingGrid,
    twist: Twist,
    reward: Callable[[Tensor], Tensor],
    *,
    particles: int,
    kind: str = "ddpm",
    eta: float = 1.0,
    resample: bool = True,
    ess_threshold: float = 0.5,
    pick: str = "sample",
    clip_x0: bool | None = None,
    generator: Generator = None,
    probe: Probe | None = None,
    progress: Progress = False,
) -> SMCResult:
    """Twisted SMC on the ``kind`` chain ("ddpm", or "ddim" with ``eta`` > 0): x_T [B * K, C, H, W]
    (image-major), ``reward(x_0) -> [B * K]`` the last twist (lambda log p(y | x_0)). Resamples an
    image's particles (systematically) when their ESS < ``ess_threshold`` * K, checked every step.
    ``pick``: "sample" returns one particle per image drawn by the final weights, "best" the one
    with the highest reward."""
    k = particles
    if x_T.shape[0] % k:
        raise PPAPError(f"{x_T.shape[0]} particles is not a multiple of {k} per image")
    if kind not in ("ddpm", "ddim") or (kind == "ddim" and not eta > 0):
        raise PPAPError(f"particle methods need a stochastic step: ddpm, or ddim with eta > 0 (got {kind}, eta={eta:g})")
    num = x_T.shape[0] // k
    timesteps = grid.timesteps.tolist()
    state = start(twist, x_T, timesteps[0])
    log_w = state.log_twist.view(num, k).clone()  # the first target p(x_T) p~_T(y | x_T) over the proposal p(x_T)
    log_z = torch.zeros(num, dtype=torch.float64)
    ess, resampled, history = [], [], []
    for i, t_int in enumerate(_steps(timesteps, progress, "SMC")):
        ess.append(effective_sample_size(log_w))
        do = ess[-1] < ess_threshold * k if resample else torch.zeros(num, dtype=torch.bool)
        resampled.append(do)
        if probe is not None:
            history.append(probe(state.x, torch.full((x_T.shape[0],), t_int, device=x_T.device), state.pred))
        if bool(do.any()):
            log_z = log_z + torch.where(do, torch.logsumexp(log_w, -1) - math.log(k), torch.zeros_like(log_z))
            index = flat_index(torch.where(do[:, None], systematic_resample(log_w, generator), torch.arange(k)), k)
            state = state.select(index)
            history = [{name: v[index.to(v.device)] for name, v in h.items()} for h in history]  # each particle's ancestors
            log_w = torch.where(do[:, None], torch.zeros_like(log_w), log_w)
        state, increment = smc_step(
            denoiser, grid, i, state, twist, reward, kind=kind, eta=eta, clip_x0=clip_x0, generator=_per_particle(generator, k)
        )
        log_w = log_w + increment.view(num, k)
    log_z = log_z + torch.logsumexp(log_w, -1) - math.log(k)
    log_w = normalize_log_weights(log_w)
    if pick == "best":
        chosen = state.log_twist.view(num, k).argmax(-1)
    elif k == 1:
        chosen = torch.zeros(num, dtype=torch.long)
    else:
        chosen = draw_one(log_w, generator)
    x = state.x
    probes = {name: torch.stack([h[name] for h in history]) for name in (history[0] if history else {})}
    return SMCResult(
        x[flat_index(chosen[:, None], k).to(x.device)], x, log_w, chosen, torch.stack(ess), torch.stack(resampled), timesteps, log_z, probes
    )


def _per_particle(generator: Generator, particles: int) -> Generator:
    """A generator list of one per image becomes one per particle (each image's generator drawn
    ``particles`` times in turn), so that ``randn_tensor`` takes each image's noise from its own."""
    if isinstance(generator, list) and particles > 1:
        return [g for g in generator for _ in range(particles)]
    return generator


def build_twist(
    method: str,
    denoiser: DenoiserFn,
    net: Callable[[Tensor], Tensor],
    task: Task,
    target: Tensor,
    scale: float,
    bank: ExpertBank | None = None,
) -> tuple[Twist, CleanReward]:
    """The twist of ``method`` and the final reward, for per-particle targets [N]."""
    if method not in PARTICLE_SPECS:
        raise PPAPError(f"unknown particle method {method!r}; valid: {', '.join(PARTICLE_SPECS)}")
    reward = CleanReward(net, task, target, scale)
    kind = PARTICLE_SPECS[method].twist
    if kind == "none":
        return NoTwist(denoiser), reward
    if kind in ("x0", "x0-grad"):
        return X0Twist(denoiser, reward, gradient=kind == "x0-grad"), reward
    if bank is None:
        raise PPAPError(f"method {method!r} needs --experts")
    abar = denoiser.schedule.alphas_cumprod if PARTICLE_SPECS[method].anneal else None
    return ExpertTwist(denoiser, bank, task, target, scale, gradient=kind == "experts-grad", alphas_cumprod=abar), reward


def sample_particles(
    method: str,
    denoiser: DenoiserFn,
    x_T: Tensor,
    grid: SamplingGrid,
    *,
    particles: int,
    net: Callable[[Tensor], Tensor],
    task: Task,
    target: Tensor,
    scale: float,
    bank: ExpertBank | None = None,
    kind: str = "ddpm",
    eta: float = 1.0,
    ess_threshold: float = 0.5,
    generator: Generator = None,
    probe: Probe | None = None,
    progress: Progress = False,
) -> SMCResult:
    """``method`` (a key of ``PARTICLE_SPECS``) with ``particles`` per image: x_T [B * K, C, H, W]
    (``particle_noise``), ``target`` [B] one class per image, ``scale`` the exponent lambda.
    ``denoiser`` takes the B * K particles (its condition repeated per particle)."""
    if not isinstance(particles, int) or isinstance(particles, bool) or particles < 1:
        raise PPAPError(f"particles must be an integer >= 1, got {particles!r}")
    spec = PARTICLE_SPECS.get(method)
    if spec is None:
        raise PPAPError(f"unknown particle method {method!r}; valid: {', '.join(PARTICLE_SPECS)}")
    per_particle = target.repeat_interleave(particles)
    twist, reward = build_twist(method, denoiser, net, task, per_particle, scale, bank)
    return sample_smc(
        denoiser,
        x_T,
        grid,
        twist,
        reward,
        particles=particles,
        kind=kind,
        eta=eta,
        resample=spec.resample,
        ess_threshold=ess_threshold,
        pick=spec.pick,
        generator=generator,
        probe=probe,
        progress=progress,
    )


def sample_particle_term(
    all_terms, particles, diffusion, scheduler, num_inference_steps: int, eta: float, cond, generator, latents, batch_size: int, device, bar
) -> SMCResult:
    """``PPAPPipeline.__call__``'s particle branch: the run of the one particle-method term in
    ``all_terms`` with the pipeline's ``diffusion`` and ``scheduler``, K = ``particles`` per image."""
    methods = ", ".join(PARTICLE_SPECS)
    if len(all_terms) != 1 or all_terms[0].method not in PARTICLE_SPECS:
        named = " + ".join(t.method for t in all_terms) or "unguided"
        raise PPAPError(f"particles= is for one term of a particle method ({methods}), got {named}")
    term = all_terms[0]
    if particles is None or isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise PPAPError(f"method {term.method!r} needs particles >= 1 (--particles K), got {particles!r}")
    kind = OWN_LOOPS.get(type(scheduler).__name__)
    if kind is None or (kind == "ddim" and not eta > 0):
        got = f"ddim with eta {eta:g}" if kind == "ddim" else type(scheduler).__name__
        raise PPAPError(f"method {term.method!r} samples the ddpm chain or ddim with eta > 0, not {got} (--sampler ddpm, or --eta 1)")
    shape = diffusion.image_shape
    if latents is None:
        x = particle_noise(batch_size, particles, shape, generator, device)
    else:
        x = latents.to(torch.float32).to(device).repeat_interleave(particles, 0)
    rows = torch.arange(batch_size).repeat_interleave(particles)
    denoiser = diffusion.bind(None if cond is None else cond.select(rows))
    net: Any = term.net
    bank = term.experts
    if bank is not None:
        bank.eval()  # as the gradient methods run it (the caller's mode comes back after the call)
    if bank is not None and net is bank.guide:  # the bank's own net carries its adapters: the clean model is its teacher
        net = bank.teacher
    grid = NoiseSchedule.from_diffusers(scheduler).grid(num_inference_steps, kind)
    return sample_particles(
        term.method,
        denoiser,
        x,
        grid,
        particles=particles,
        net=net,
        task=term.task,
        target=term.targets.to(device),
        scale=term.scale,
        bank=bank,
        kind=kind,
        eta=eta,
        generator=generator,
        progress=bar,
    )
