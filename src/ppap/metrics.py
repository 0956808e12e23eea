"""Measurements: classifier accuracy, and FID / KID / precision-recall in evaluator features."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn


@torch.no_grad()
def predict(net: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Logits of ``net`` in eval mode over x [N, C, H, W] in batches; ``net`` keeps its own mode."""
    with eval_mode(net):
        return torch.cat([net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    return (predict(net, x, batch_size).argmax(-1) == y).float().mean().item()


@torch.no_grad()
def features(evaluator: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Evaluator embeddings [N, D] (float64) for FID / KID / precision-recall, in eval mode;
    ``evaluator`` keeps its own mode."""
    with eval_mode(evaluator):
        return torch.cat([evaluator.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double()


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode for the block, then every submodule back in the mode it came in."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for m, mode in modes:
            m.training = mode


def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def fid(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]
    (Heusel et al., 2017): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross.trace()).item()


def kid(a: Tensor, b: Tensor, subsets: int = 20, subset_size: int = 500, seed: int = 0) -> float:
    """Kernel inception distance (Bińkowski et al., 2018): unbiased MMD^2 with the cubic
    polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over random subsets."""
    g = torch.Generator().manual_seed(seed)
    n = min(subset_size, len(a), len(b))
    d = a.shape[1]
    out = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:n]]
        y = b[torch.randperm(len(b), generator=g)[:n]]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = 1 - torch.eye(n, dtype=x.dtype)
        out.append(((kxx * off).sum() / (n * (n - 1)) + (kyy * off).sum() / (n * (n - 1)) - 2 * kxy.mean()).item())
    return sum(out) / len(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019): a sample is inside a set's
    manifold if it lies within the k-NN radius of some member of that set."""

    def radii(x: Tensor) -> Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

    def coverage(points: Tensor, ref: Tensor, ref_r: Tensor) -> float:
        return (torch.cdist(points, ref) <= ref_r[None]).any(1).double().mean().item()

    r_real, r_fake = radii(real), radii(fake)
    return coverage(fake, real, r_real), coverage(real, fake, r_fake)


def mean_iou(pred: Tensor, truth: Tensor, num_classes: int) -> float:
    """Mean intersection-over-union over the classes present in ``pred`` or ``truth`` [N, H, W]."""
    ious = []
    for c in range(num_classes):
        p, t = pred == c, truth == c
        union = (p | t).sum().item()
        if union:
            ious.append((p & t).sum().item() / union)
    return sum(ious) / len(ious)


@torch.no_grad()
def score_under_noise(
    model, schedule, x: Tensor, timesteps: list[int], score: Callable[[Tensor], float], seed: int = 0, batch_size: int = 500
) -> dict[int, float]:
    """``score(outputs)`` of ``model(x_t, t)`` on x_t = q_sample(x, t) for each t (the
    noise-vs-accuracy analysis, PPAP Sec. 3). The model gets the timestep, so expert banks route;
    plain nets ignore it through a lambda. The same noise is used for every t (fixed seed)."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    out = {}
    for t in timesteps:
        tt = torch.full((len(x),), int(t), dtype=torch.long)
        x_t = schedule.q_sample(x, tt, noise)
        out[int(t)] = score(torch.cat([model(x_t[i : i + batch_size], tt[i : i + batch_size]) for i in range(0, len(x), batch_size)]))
    return out


def accuracy_under_noise(
    model, schedule, x: Tensor, y: Tensor, timesteps: list[int], seed: int = 0, batch_size: int = 500
) -> dict[int, float]:
    """Classification accuracy on noised images (``score_under_noise`` with the labels ``y``)."""
    return score_under_noise(model, schedule, x, timesteps, lambda logits: (logits.argmax(-1) == y).float().mean().item(), seed, batch_size)
