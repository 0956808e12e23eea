"""Sequential Monte Carlo machinery: log-weights, effective sample size, systematic resampling.

Weights are kept as log-weights [B, K]: B independent particle systems (one per requested
image) of K particles each. Randomness comes from the caller's generator (one, or one per image,
as the samplers take it), so that a seed gives the same resampling on every run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .samplers import Generator


def normalize_log_weights(log_w: Tensor) -> Tensor:
    """log w_k - logsumexp(log w) per row of [B, K] (float64). A row of -inf only (every particle
    impossible) becomes uniform rather than NaN."""
    log_w = log_w.double()
    dead = torch.isneginf(log_w).all(-1, keepdim=True)
    log_w = torch.where(dead, torch.zeros_like(log_w), log_w)
    return log_w - torch.logsumexp(log_w, -1, keepdim=True)


def effective_sample_size(log_w: Tensor) -> Tensor:
    """Kish's ESS 1 / sum_k w_k^2 of the normalised weights, per row of [B, K] -> [B]: K for
    equal weights, 1 when one particle holds all the weight."""
    return 1.0 / normalize_log_weights(log_w).exp().square().sum(-1)


def uniforms(num: int, generator: Generator) -> Tensor:
    """``num`` draws of U[0, 1) (float64, CPU): row b from generator b when given a list."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64).cpu() for g in generator])
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(num, generator=generator, device=device, dtype=torch.float64).cpu()


def _inverse_cdf(log_w: Tensor, points: Tensor) -> Tensor:
    """The particle index of each point of [B, M] in [0, 1) under the normalised weights of [B, K]."""
    cdf = normalize_log_weights(log_w).exp().cpu().cumsum(-1)
    cdf[:, -1] = 1.0  # rounding must not leave a point beyond the last particle
    return torch.searchsorted(cdf, points, right=True).clamp(max=log_w.shape[-1] - 1)


def systematic_resample(log_w: Tensor, generator: Generator = None) -> Tensor:
    """Systematic resampling (Kitagawa 1996): K points (u + k) / K, one uniform u per row, through
    the inverse CDF of the weights. Returns ancestor indices [B, K] (within each row, sorted);
    particle k is drawn floor(K w_k) or ceil(K w_k) times."""
    num, k = log_w.shape
    points = (uniforms(num, generator)[:, None] + torch.arange(k, dtype=torch.float64)) / k
    return _inverse_cdf(log_w, points).to(log_w.device)


def draw_one(log_w: Tensor, generator: Generator = None) -> Tensor:
    """One particle index per row of [B, K], drawn with probability w_k -> [B]."""
    return _inverse_cdf(log_w, uniforms(log_w.shape[0], generator)[:, None])[:, 0].to(log_w.device)


def flat_index(index: Tensor, particles: int) -> Tensor:
    """Indices within each image's particles [B, M] -> indices into the flat [B * particles] batch."""
    return (index + particles * torch.arange(index.shape[0], device=index.device)[:, None]).reshape(-1)


def shifted_gaussian_log_ratio(x: Tensor, proposal_mean: Tensor, shift: Tensor, var: Tensor | float) -> Tensor:
    """log N(x; m, var) - log N(x; m + shift, var) for the proposal mean m + shift, summed over all
    but the first dimension -> [N]. With d = x - (m + shift) it is sum(-(d shift) / var -
    shift^2 / (2 var)): no difference of two large log-densities (exact in float32)."""
    d = x - proposal_mean
    return (-(d * shift) / var - shift.square() / (2 * var)).flatten(1).sum(-1)
