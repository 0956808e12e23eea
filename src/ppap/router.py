"""The timestep router: which noise-range expert guides at a training timestep t.

Also home of the one check that a timestep, or a half-open range of timesteps [lo, hi), is
valid: the router, the guidance terms' intervals and the noise schedule all call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PPAPError


def check_timestep_range(lo: int, hi: int, num_train_timesteps: int | None = None, what: str = "timestep range") -> tuple[int, int]:
    """``(lo, hi)`` when [lo, hi) is a non-empty half-open range of integer training timesteps,
    0 <= lo < hi (<= T when ``num_train_timesteps`` is given); else a one-line PPAPError naming it."""
    integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi))
    if integers and 0 <= lo < hi and (num_train_timesteps is None or hi <= num_train_timesteps):
        return lo, hi
    if not integers:
        raise PPAPError(f"{what} {(lo, hi)} must be two integer timesteps lo < hi")
    within = "starts below 0" if num_train_timesteps is None else f"outside [0, {num_train_timesteps})"
    raise PPAPError(f"{what} [{lo}, {hi}) is empty or {within}")


def check_timesteps(t: Tensor, num_train_timesteps: int, where: str = "") -> None:
    """Refuse training timesteps t [B] outside [0, T - 1] (fractional t, as Euler or Karras
    spacings give, inside it pass); ``where`` names the range in the message."""
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > num_train_timesteps - 1):
        bad = float(t.min()) if float(t.min()) < 0 else float(t.max())
        raise PPAPError(f"timestep {bad:g} is outside {where}[0, {num_train_timesteps})")


@dataclass(frozen=True)
class TimestepRouter:
    """Partition of the training timesteps [0, T) into half-open ranges [b_i, b_{i+1}).

    Unlike the official code (which sends t = 200, 400, ... to the *lower* expert while training
    them in the upper one), the expert that trained on t is the expert that guides at t.
    """

    boundaries: tuple[int, ...]  # (0, b_1, ..., T), strictly increasing

    def __post_init__(self):
        b = tuple(int(v) for v in self.boundaries)
        object.__setattr__(self, "boundaries", b)
        if len(b) < 2:
            raise PPAPError(f"a router needs at least one range, got boundaries {list(b)}")
        if b[0] != 0:
            raise PPAPError(f"the first range must start at timestep 0, not {b[0]} (timesteps 0..{b[0] - 1} would have no expert)")
        for lo, hi in zip(b, b[1:]):
            if hi <= lo:
                raise PPAPError(f"boundaries must increase strictly: {lo} then {hi} in {list(b)}")

    @property
    def num_experts(self) -> int:
        return len(self.boundaries) - 1

    @property
    def num_train_timesteps(self) -> int:
        return self.boundaries[-1]

    @classmethod
    def uniform(cls, num_experts: int, num_train_timesteps: int) -> TimestepRouter:
        """N equal ranges in timestep index, the official code's split: [int(n T / N), int((n+1) T / N))."""
        if not 1 <= num_experts <= num_train_timesteps:
            raise PPAPError(f"number of experts {num_experts} must be in [1, {num_train_timesteps}]")
        return cls(tuple(int(n * num_train_timesteps / num_experts) for n in range(num_experts + 1)))

    @classmethod
    def from_ranges(cls, ranges: Sequence[tuple[int, int]], num_train_timesteps: int) -> TimestepRouter:
        """Explicit half-open ranges; they must tile [0, T) with no gap and no overlap."""
        ranges = sorted((int(lo), int(hi)) for lo, hi in ranges)
        if not ranges:
            raise PPAPError("no timestep ranges given")
        for lo, hi in ranges:
            check_timestep_range(lo, hi, num_train_timesteps)
        for (lo0, hi0), (lo1, hi1) in zip(ranges, ranges[1:]):
            if hi0 < lo1:
                raise PPAPError(f"gap between timestep ranges [{lo0}, {hi0}) and [{lo1}, {hi1}): timesteps {hi0}..{lo1 - 1} have no expert")
            if hi0 > lo1:
                raise PPAPError(f"timestep ranges [{lo0}, {hi0}) and [{lo1}, {hi1}) overlap")
        if ranges[0][0] != 0 or ranges[-1][1] != num_train_timesteps:
            lo, hi = (0, ranges[0][0]) if ranges[0][0] != 0 else (ranges[-1][1], num_train_timesteps)
            raise PPAPError(f"timesteps {lo}..{hi - 1} have no expert: the ranges must cover [0, {num_train_timesteps})")
        return cls((0,) + tuple(hi for _, hi in ranges))

    @classmethod
    def equal_log_snr(cls, num_experts: int, alphas_cumprod: Tensor) -> TimestepRouter:
        """N ranges of equal width in log-SNR = log(abar / (1 - abar)) instead of in t: more,
        narrower experts where the signal-to-noise ratio changes fast (low t for a linear schedule)."""
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        T = len(abar)
        if not 1 <= num_experts <= T:
            raise PPAPError(f"number of experts {num_experts} must be in [1, {T}]")
        log_snr = (abar / (1 - abar)).log()  # decreasing in t; -inf where abar = 0 (zero terminal SNR)
        lowest = log_snr[torch.isfinite(log_snr)].min()  # such timesteps fall in the last range
        levels = log_snr[0] + (lowest - log_snr[0]) * torch.arange(1, num_experts, dtype=torch.float64) / num_experts
        inner = [int((log_snr > v).sum()) for v in levels]  # first t whose log-SNR is at or below the level
        bounds = [0]
        for b in inner:
            bounds.append(min(max(b, bounds[-1] + 1), T - (num_experts - len(bounds))))
        return cls(tuple(bounds) + (T,))

    @classmethod
    def parse(cls, spec: str, num_train_timesteps: int, alphas_cumprod: Tensor | None = None) -> TimestepRouter:
        """``'5'`` (uniform in t), ``'logsnr:5'`` (uniform in log-SNR; needs the schedule's
        ``alphas_cumprod``) or ``'0-200,200-500,500-1000'`` (explicit ranges)."""
        spec = spec.strip()
        if spec.isdigit():
            return cls.uniform(int(spec), num_train_timesteps)
        if spec.startswith("logsnr:") and spec[7:].isdigit():
            if alphas_cumprod is None:
                raise PPAPError(f"expert ranges {spec!r} need the diffusion model's noise schedule")
            return cls.equal_log_snr(int(spec[7:]), alphas_cumprod)
        try:
            ranges = [tuple(int(v) for v in part.split("-")) for part in spec.split(",")]
            if any(len(r) != 2 for r in ranges):
                raise ValueError
        except ValueError:
            raise PPAPError(f"bad expert ranges {spec!r}: use a count ('5'), 'logsnr:5' or 'lo-hi,lo-hi,...'") from None
        return cls.from_ranges([(r[0], r[1]) for r in ranges], num_train_timesteps)

    def interval(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_experts:
            raise PPAPError(f"expert {i} does not exist (there are {self.num_experts})")
        return self.boundaries[i], self.boundaries[i + 1]

    def __call__(self, t: Tensor) -> Tensor:
        """[B] training timesteps -> [B] expert ids."""
        t = torch.as_tensor(t)
        check_timesteps(t, self.num_train_timesteps, "the experts' range ")
        inner = torch.tensor(self.boundaries[1:-1], dtype=t.dtype, device=t.device)
        return torch.bucketize(t.contiguous(), inner, right=True)
