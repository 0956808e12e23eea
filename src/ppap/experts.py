"""Noise-range experts: a timestep router and banks of experts behind one routed call.

``LoRAExperts`` is PPAP proper: ONE frozen off-the-shelf network with N named peft LoRA adapters
(``expert_0`` ... ``expert_{N-1}``), switched with ``set_adapter``. ``FullExperts`` holds N full
copies; it exists only for the supervised baselines the paper compares against.

BatchNorm: the off-the-shelf statistics were measured on clean images, and the activations of
x_t at high noise have a very different mean and variance. A LoRA delta cannot undo that, so by
default every normalisation layer is put in peft's ``modules_to_save``: each expert gets its own
small copy (affine + running statistics), as the official code's per-expert BN does, while the
original layer (the teacher's) stays bit-identical. ``per_expert_norm=False`` freezes them instead.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import LongTensor, Tensor, nn

from .io import PPAPError, atomic_save_safetensors, fingerprint, load_safetensors, load_weights_into

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


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
    def uniform(cls, num_experts: int, num_train_timesteps: int) -> "TimestepRouter":
        """N equal ranges in timestep index, the official code's split: [int(n T / N), int((n+1) T / N))."""
        if not 1 <= num_experts <= num_train_timesteps:
            raise PPAPError(f"number of experts {num_experts} must be in [1, {num_train_timesteps}]")
        return cls(tuple(int(n * num_train_timesteps / num_experts) for n in range(num_experts + 1)))

    @classmethod
    def from_ranges(cls, ranges: Sequence[tuple[int, int]], num_train_timesteps: int) -> "TimestepRouter":
        """Explicit half-open ranges; they must tile [0, T) with no gap and no overlap."""
        ranges = sorted((int(lo), int(hi)) for lo, hi in ranges)
        if not ranges:
            raise PPAPError("no timestep ranges given")
        for lo, hi in ranges:
            if not 0 <= lo < hi <= num_train_timesteps:
                raise PPAPError(f"timestep range [{lo}, {hi}) is empty or outside [0, {num_train_timesteps})")
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
    def equal_log_snr(cls, num_experts: int, alphas_cumprod: Tensor) -> "TimestepRouter":
        """N ranges of equal width in log-SNR = log(abar / (1 - abar)) instead of in t: more,
        narrower experts where the signal-to-noise ratio changes fast (low t for a linear schedule)."""
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        T = len(abar)
        if not 1 <= num_experts <= T:
            raise PPAPError(f"number of experts {num_experts} must be in [1, {T}]")
        log_snr = (abar / (1 - abar)).log()  # decreasing in t
        levels = log_snr[0] + (log_snr[-1] - log_snr[0]) * torch.arange(1, num_experts, dtype=torch.float64) / num_experts
        inner = [int((log_snr > v).sum()) for v in levels]  # first t whose log-SNR is at or below the level
        bounds = [0]
        for b in inner:
            bounds.append(min(max(b, bounds[-1] + 1), T - (num_experts - len(bounds))))
        return cls(tuple(bounds) + (T,))

    @classmethod
    def parse(cls, spec: str, num_train_timesteps: int, alphas_cumprod: Tensor | None = None) -> "TimestepRouter":
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
        return cls.from_ranges(ranges, num_train_timesteps)

    def interval(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_experts:
            raise PPAPError(f"expert {i} does not exist (there are {self.num_experts})")
        return self.boundaries[i], self.boundaries[i + 1]

    def __call__(self, t: LongTensor) -> LongTensor:
        """[B] training timesteps -> [B] expert ids."""
        t = torch.as_tensor(t)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise PPAPError(f"timestep {bad} is outside the experts' range [0, {self.num_train_timesteps})")
        inner = torch.tensor(self.boundaries[1:-1], dtype=t.dtype, device=t.device)
        return torch.bucketize(t, inner, right=True)


# --------------------------------------------------------------------------------------------
# Banks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "lora"  # "lora": PPAP, peft adapters on one frozen net; "full": N full copies
    rank: int = 8  # LoRA rank r
    alpha: float = 8.0  # LoRA alpha; the update is scaled by alpha / r
    per_expert_norm: bool = True  # own norm layers (affine + running stats) per expert
    target_modules: tuple[str, ...] | None = None  # None: every Conv2d and Linear

    def __post_init__(self):
        if self.kind not in ("lora", "full"):
            raise PPAPError(f"unknown adapter kind {self.kind!r}; valid: 'lora', 'full'")
        if self.rank < 1:
            raise PPAPError(f"LoRA rank must be >= 1, got {self.rank}")


def expert_name(i: int) -> str:
    return f"expert_{i}"


class ExpertBank(nn.Module):
    """Experts behind one call ``bank(x, t)``: each sample goes to the expert owning its t.

    Subclasses implement ``run_expert``, ``teacher``, state access and saving. The bank's mode
    (train/eval) is the caller's business, as for any nn.Module.
    """

    router: TimestepRouter
    adapter: AdapterConfig
    base_fingerprint: str  # sha256 of the off-the-shelf weights the experts were built on

    def train(self, mode: bool = True) -> "ExpertBank":
        """Train mode for the experts only: frozen layers keep eval-mode statistics, so the
        teacher's BatchNorm buffers never move."""
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def forward(self, x: Tensor, t: LongTensor) -> Tensor:
        """x [B, ...] in the guidance net's input convention, t [B] training timesteps."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        ids = self.router(t)
        experts = ids.unique().tolist()
        if len(experts) == 1:  # the sampling case: all samples share t
            return self.run_expert(experts[0], x)
        out = None
        for i in experts:
            mask = ids == i
            y = self.run_expert(i, x[mask])
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out[mask] = y
        return out

    def run_expert(self, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def teacher(self, x: Tensor) -> Tensor:
        """The off-the-shelf network's output (frozen weights, eval-mode statistics)."""
        raise NotImplementedError

    def trainable_parameters(self, i: int) -> list[nn.Parameter]:
        raise NotImplementedError

    def expert_state(self, i: int) -> dict[str, Tensor]:
        """Everything expert i owns (trainable weights and its norm statistics)."""
        raise NotImplementedError

    def load_expert_state(self, i: int, state: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def base_state(self) -> dict[str, Tensor]:
        """The off-the-shelf network's own tensors, for checking they never change."""
        raise NotImplementedError

    def save_expert(self, i: int, directory: str | os.PathLike) -> None:
        raise NotImplementedError

    def load_expert(self, i: int, directory: str | os.PathLike) -> None:
        raise NotImplementedError


class _Rooted(nn.Module):
    """Puts the user's net under one name, so every module path has a dot in it. peft matches
    ``modules_to_save`` by plain suffix, and a bare nn.Sequential name like "1" would otherwise
    match adapter paths such as "0.lora_A.expert_1"."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _module_names(net: nn.Module, types) -> list[str]:
    return [n for n, m in net.named_modules() if n and isinstance(m, types)]


class LoRAExperts(ExpertBank):
    """PPAP's bank: one frozen net, N peft LoRA adapters (plus per-expert norm copies)."""

    def __init__(self, net: nn.Module, router: TimestepRouter, adapter: AdapterConfig = AdapterConfig(), seed: int = 0):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if adapter.kind != "lora":
            raise PPAPError("LoRAExperts needs AdapterConfig(kind='lora')")
        self.router, self.adapter = router, adapter
        self.base_fingerprint = fingerprint(net.state_dict())
        net = _Rooted(net.requires_grad_(False).eval())
        targets = list(adapter.target_modules or _module_names(net, (nn.Conv2d, nn.Linear)))
        if not targets:
            raise PPAPError("the guidance network has no Conv2d or Linear layer for LoRA")
        norms = _module_names(net, NORM_TYPES) if adapter.per_expert_norm else []
        # a full-match regex, so that names like "0" in an nn.Sequential never match by suffix
        config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha,
                            target_modules="|".join(re.escape(n) for n in targets), modules_to_save=norms or None)
        # LoRA A matrices are drawn from torch's global RNG: fix it (and only here), so that every
        # process of a data-parallel run, and every re-run, starts from the same experts
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = get_peft_model(net, config, adapter_name=expert_name(0))
            for i in range(1, router.num_experts):
                self.model.add_adapter(expert_name(i), config)
        self._active = 0
        self.model.set_adapter(expert_name(0))

    def frozen_modules(self) -> list[nn.Module]:
        if self.adapter.per_expert_norm:
            return []
        return [m for m in self.model.modules() if isinstance(m, NORM_TYPES)]

    def _activate(self, i: int) -> None:
        if i != self._active:
            self.model.set_adapter(expert_name(i))
            self._active = i

    def run_expert(self, i: int, x: Tensor) -> Tensor:
        self._activate(i)
        return self.model(x)

    def teacher(self, x: Tensor) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(x)
        finally:
            self.model.train(was_training)

    def trainable_parameters(self, i: int) -> list[nn.Parameter]:
        tag = f".{expert_name(i)}."
        return [p for n, p in self.model.named_parameters() if tag in n]

    def expert_state(self, i: int) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=expert_name(i)).items()}

    def load_expert_state(self, i: int, state: dict[str, Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state, adapter_name=expert_name(i))
        if result.unexpected_keys:
            raise PPAPError(f"adapter weights do not fit the model (unexpected {result.unexpected_keys[:3]})")

    def base_state(self) -> dict[str, Tensor]:
        skip = ("lora_", "modules_to_save")
        return {k: v for k, v in self.model.state_dict().items() if not any(s in k for s in skip)}

    def save_expert(self, i: int, directory: str | os.PathLike) -> None:
        """Write ``directory/expert_i/{adapter_config.json, adapter_model.safetensors}`` (peft layout)."""
        self.model.save_pretrained(str(directory), selected_adapters=[expert_name(i)], safe_serialization=True)
        (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing useful

    def load_expert(self, i: int, directory: str | os.PathLike) -> None:
        path = Path(directory) / expert_name(i)
        state = load_safetensors(path / "adapter_model.safetensors")  # one-line errors for missing/corrupt
        want = set(self.expert_state(i))
        if set(state) != want:
            extra = sorted(set(state) - want) or sorted(want - set(state))
            raise PPAPError(f"adapter {path} does not fit the guidance model (mismatched keys, e.g. {extra[0]})")
        try:
            self.load_expert_state(i, state)
        except RuntimeError as e:  # shape mismatch: another rank or another backbone
            raise PPAPError(f"adapter {path} does not fit the guidance model ({str(e).splitlines()[-1].strip()[:160]})") from None


class FullExperts(ExpertBank):
    """N fully fine-tuned copies (the supervised multi-expert / noise-aware baselines)."""

    def __init__(self, net: nn.Module, router: TimestepRouter, adapter: AdapterConfig = AdapterConfig(kind="full")):
        super().__init__()
        self.router, self.adapter = router, adapter
        self.base_fingerprint = fingerprint(net.state_dict())
        self.base = net.requires_grad_(False).eval()
        self.experts = nn.ModuleDict({expert_name(i): copy.deepcopy(net).requires_grad_(True) for i in range(router.num_experts)})

    def frozen_modules(self) -> list[nn.Module]:
        return [self.base]

    def run_expert(self, i: int, x: Tensor) -> Tensor:
        return self.experts[expert_name(i)](x)

    def teacher(self, x: Tensor) -> Tensor:
        self.base.eval()
        return self.base(x)

    def trainable_parameters(self, i: int) -> list[nn.Parameter]:
        return list(self.experts[expert_name(i)].parameters())

    def expert_state(self, i: int) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.experts[expert_name(i)].state_dict().items()}

    def load_expert_state(self, i: int, state: dict[str, Tensor]) -> None:
        self.experts[expert_name(i)].load_state_dict(state, strict=True)

    def base_state(self) -> dict[str, Tensor]:
        return self.base.state_dict()

    def save_expert(self, i: int, directory: str | os.PathLike) -> None:
        atomic_save_safetensors(Path(directory) / expert_name(i) / "model.safetensors", self.expert_state(i))

    def load_expert(self, i: int, directory: str | os.PathLike) -> None:
        load_weights_into(self.experts[expert_name(i)], Path(directory) / expert_name(i) / "model.safetensors")


def make_bank(net: nn.Module, router: TimestepRouter, adapter: AdapterConfig, seed: int = 0) -> ExpertBank:
    if adapter.kind == "lora":
        return LoRAExperts(net, router, adapter, seed=seed)
    return FullExperts(net, router, adapter)


def parameter_report(bank: ExpertBank) -> dict[str, float]:
    """Trainable parameters of one expert, as a count and as a fraction of the backbone."""
    backbone = sum(v.numel() for k, v in bank.base_state().items() if v.is_floating_point() and "running_" not in k)
    per_expert = sum(p.numel() for p in bank.trainable_parameters(0))
    return {"backbone_parameters": backbone, "trainable_per_expert": per_expert,
            "fraction_per_expert": per_expert / backbone, "num_experts": bank.router.num_experts}
