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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .diffusion import NoiseSchedule
from .guide_model import GuideModel
from .io import (
    PPAPError,
    atomic_save_safetensors,
    atomic_write_json,
    check_fields,
    file_sha256,
    fingerprint,
    give_usual_permissions,
    load_safetensors,
    load_weights_into,
    read_json,
)
from .tasks import Task, make_task

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
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise PPAPError(f"timestep {bad} is outside the experts' range [0, {self.num_train_timesteps})")
        inner = torch.tensor(self.boundaries[1:-1], dtype=t.dtype, device=t.device)
        return torch.bucketize(t.contiguous(), inner, right=True)


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

    ``x`` is what the guide takes: images in [-1, 1] at the diffusion model's size; the bank's
    ``guide`` (a ``GuideModel``) does the off-the-shelf model's own preprocessing and output
    reading for every expert. Subclasses implement ``run_expert``, ``teacher``, state access and
    saving. The bank's mode (train/eval) is the caller's business, as for any nn.Module.
    """

    router: TimestepRouter
    adapter: AdapterConfig
    guide: GuideModel
    base_fingerprints: dict[str, str]  # sha256 of the off-the-shelf weights the experts were built on, per precision
    task: Task | None = None  # set when loaded from disk (what the experts were trained for)
    default_scale: float | None = None  # the bank's measured best guidance scale, when its card records one
    blend: int = 0  # soft routing: width (timesteps) of the blend of neighbouring experts at each boundary

    @property
    def base_fingerprint(self) -> str:
        """The off-the-shelf weights' fingerprint (their values in float32)."""
        return self.base_fingerprints["float32"]

    def train(self, mode: bool = True) -> ExpertBank:
        """Train mode for the experts only: frozen layers keep eval-mode statistics, so the
        teacher's BatchNorm buffers never move."""
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def forward(self, x: Tensor, t: Tensor, *, blend: int | None = None) -> Tensor:
        """x [B, C, H, W] in [-1, 1], t [B] training timesteps. ``blend``: the soft-routing width
        of this call (None: the bank's own ``blend``), so that a caller routes softly without
        changing a bank others share."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        blend = self.blend if blend is None else blend
        if blend > 0:
            return self._blended(x, t, blend)
        ids = self.router(t)
        experts = ids.unique().tolist()
        if len(experts) == 1:  # the sampling case: all samples share t
            return self.run_expert(experts[0], x)
        out = None
        for i in experts:  # several experts in one autograd graph: none is merged into the weights
            mask = ids == i
            y = self.run_expert(i, x[mask], whole_batch=False)
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out[mask] = y
        assert out is not None  # at least one expert ran
        return out

    def _blended(self, x: Tensor, t: Tensor, blend: int) -> Tensor:
        """Soft routing: within ``blend / 2`` timesteps of a boundary the output is the linear
        blend of the two neighbouring experts' outputs (their weights 1/2 each at the boundary)."""
        half = blend / 2
        out = None
        levels = t.unique().tolist()
        for tv in levels:
            mask = t == tv
            xs = x[mask]
            i = int(self.router(torch.tensor([tv]))[0])
            lo, hi = self.router.interval(i)
            if tv - lo < half and i > 0:
                j, w_j = i - 1, 0.5 - (tv - lo) / (2 * half)
            elif hi - tv <= half and i + 1 < self.router.num_experts:
                j, w_j = i + 1, 0.5 - (hi - tv) / (2 * half)
            else:
                j, w_j = i, 0.0
            if w_j > 0:  # two experts in one graph: their LoRA branches, nothing merged
                y = (1 - w_j) * self.run_expert(i, xs, whole_batch=False) + w_j * self.run_expert(j, xs, whole_batch=False)
            else:
                y = self.run_expert(i, xs, whole_batch=len(levels) == 1)
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out[mask] = y
        assert out is not None
        return out

    def run_expert(self, i: int, x: Tensor, *, whole_batch: bool = True) -> Tensor:
        """Expert i's output on x [B, C, H, W]. ``whole_batch``: expert i serves the whole batch of
        this call (no other expert's output shares its graph), so a LoRA bank in eval mode may run
        it merged into the weights; otherwise it runs its LoRA branches."""
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

    def save_expert(self, i: int, directory: str | os.PathLike) -> list[Path]:
        """Write expert i under ``directory/expert_i``; returns the files written."""
        raise NotImplementedError

    def load_expert(self, i: int, directory: str | os.PathLike) -> None:
        raise NotImplementedError

    manifest: dict | None = None  # the manifest load_bank read (save_pretrained writes its records back)

    @classmethod
    def from_pretrained(
        cls,
        guide: nn.Module,
        pretrained: str | os.PathLike,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        schedule: NoiseSchedule | None = None,
        require_all: bool = True,
    ) -> ExpertBank:
        """``load_bank`` of a folder, a zoo name or a hub id ``org/name[@revision]`` (its JSON and
        safetensors files fetched into the HF cache; see :mod:`ppap.hub`), on ``guide``. A zoo
        bank's measured best scale becomes its ``default_scale``."""
        from . import zoo

        folder = bank_folder(pretrained, revision=revision, subfolder=subfolder)
        bank = load_bank(guide, folder, schedule=schedule, require_all=require_all)
        entry = None if Path(pretrained).is_dir() else zoo.ZOO.get(str(pretrained))
        if bank.default_scale is None and entry is not None:
            bank.default_scale = entry.scale
        return bank

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, schedule: NoiseSchedule | None = None, task: Task | None = None
    ) -> None:
        """Write the bank where ``from_pretrained`` reads it (a folder to upload to the Hub as it
        is). ``schedule`` and ``task`` default to those recorded when the bank was loaded or trained."""
        save_pretrained_bank(self, save_directory, schedule=schedule, task=task)


def as_guide_model(guide: nn.Module) -> GuideModel:
    """A plain nn.Module taking the diffusion model's images in [-1, 1] is a GuideModel as it is."""
    return guide if isinstance(guide, GuideModel) else GuideModel(guide)


def _module_names(net: nn.Module, types) -> list[str]:
    return [n for n, m in net.named_modules() if n and isinstance(m, types)]


LORA_TYPES = (nn.Conv2d, nn.Linear)  # what the bank adapts by default; peft supports both


class _Rooted(nn.Module):
    """Puts a net under one name, so every module path has a dot in it. peft finds
    ``modules_to_save`` by plain string suffix, and a top-level child named by a digit ("1" in a
    bare nn.Sequential) would also match adapter paths such as "0.lora_A.expert_1". Only such nets
    are wrapped; their saved adapters then carry a "net." prefix."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


class LoRAExperts(ExpertBank):
    """PPAP's bank: one frozen net, N peft LoRA adapters (plus per-expert norm copies).

    peft is applied to the off-the-shelf model itself (``guide.net``), so each saved expert loads
    on the bare model with ``PeftModel.from_pretrained(model, bank_dir / "expert_0")``. This is
    the one step of ppap that changes a module it is given: like peft's ``get_peft_model``, the
    bank injects its adapters into ``guide.net`` in place and freezes its own weights (eval mode,
    no grad); the bank owns that net from then on. Pass a copy (``copy.deepcopy(guide)``) to
    keep using the unadapted model (``PPAPPipeline`` and the CLI do; ``load_bank`` adapts the
    guide it is given, as this class does).

    In eval mode, an expert that serves a whole batch runs merged into the weights (the cost of
    a plain forward; ``merge_expert`` / ``unmerge``, or ``merge = False`` for separate branches);
    a batch that spans several experts runs each one's LoRA branches, nothing merged."""

    def __init__(self, guide: nn.Module, router: TimestepRouter, adapter: AdapterConfig = AdapterConfig(), seed: int = 0):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if adapter.kind != "lora":
            raise PPAPError("LoRAExperts needs AdapterConfig(kind='lora')")
        self.router, self.adapter = router, adapter
        self.guide = as_guide_model(guide)
        net = self.guide.net.requires_grad_(False).eval()
        self.base_fingerprints = weights_fingerprints(net.state_dict())
        names = dict(net.named_modules())
        if adapter.target_modules:
            unknown = [n for n in adapter.target_modules if n not in names]
            if unknown:
                raise PPAPError(f"LoRA target module {unknown[0]!r} is not in the guidance model")
            targets = list(adapter.target_modules)
        else:
            targets = _module_names(net, LORA_TYPES)
        # peft adapts a grouped convolution only when the rank is a multiple of its groups
        # (depthwise convs in SegFormer, ConvNeXt): those stay frozen, listed in ``skipped``
        self.skipped = [n for n in targets if isinstance(names[n], nn.Conv2d) and names[n].groups > 1 and adapter.rank % names[n].groups]
        targets = [n for n in targets if n not in self.skipped]
        if not targets:
            raise PPAPError("the guidance network has no Conv2d or Linear layer for LoRA")
        norms = _module_names(net, NORM_TYPES) if adapter.per_expert_norm else []
        if any("." not in n and n.isdigit() for n in norms):
            net = self.guide.net = _Rooted(net)
            targets, norms = [f"net.{n}" for n in targets], [f"net.{n}" for n in norms]
        # a full-match regex, so that names like "0" in an nn.Sequential never match by suffix
        config = LoraConfig(
            r=adapter.rank, lora_alpha=adapter.alpha, target_modules="|".join(re.escape(n) for n in targets), modules_to_save=norms or None
        )
        # LoRA A matrices are drawn from torch's global RNG: fix it (and only here), so that every
        # process of a data-parallel run, and every re-run, starts from the same experts
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = get_peft_model(net, config, adapter_name=expert_name(0))
            for i in range(1, router.num_experts):
                self.model.add_adapter(expert_name(i), config)
        self._active = 0
        self.model.set_adapter(expert_name(0))
        self.merge = True  # eval mode, one expert serving a whole batch: run it merged (the cost of a plain forward)
        self._merged: int | None = None
        self._put_aside: dict[str, Tensor] = {}  # while merged: LoRA layer name -> the base weight its merged copy stands in for

    def frozen_modules(self) -> list[nn.Module]:
        if self.adapter.per_expert_norm:
            return []
        return [m for m in self.model.modules() if isinstance(m, NORM_TYPES)]

    def _lora_layers(self) -> dict[str, Any]:  # peft LoraLayer modules
        from peft.tuners.lora import LoraLayer

        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def select(self, i: int) -> None:
        """Make expert ``i`` the active adapter (peft's ``set_adapter``), its LoRA as separate branches."""
        self.unmerge()
        if i != self._active:
            self.model.set_adapter(expert_name(i))
            self._active = i

    def merge_expert(self, i: int) -> None:
        """Merge expert ``i``'s LoRA into the adapted layers' weights, so that a call costs one plain
        forward. The merged weights are new tensors: each layer's own weight is put aside (keyed
        by its module name) and put back, the same tensor, by ``unmerge``. Nothing is changed in
        place, so an autograd graph built on any expert, merged or not, stays valid. Costs one
        extra copy of the adapted weights while merged (``merge = False`` runs the branches instead)."""
        if self._merged == i:
            return
        self.select(i)
        with torch.no_grad():
            for name, layer in self._lora_layers().items():
                base = layer.get_base_layer()
                self._put_aside[name] = base.weight
                base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
                layer.merge(adapter_names=[expert_name(i)])  # peft adds B A * scale to the copy (plain LoRA: weight only)
        self._merged = i

    def unmerge(self) -> None:
        """Back to the backbone's own weights (the very tensors, so bit for bit) and separate LoRA
        branches; a no-op when nothing is merged."""
        if self._merged is None:
            return
        layers = self._lora_layers()
        for name, weight in self._put_aside.items():
            layers[name].get_base_layer().weight = weight
            layers[name].merged_adapters = []
        self._put_aside, self._merged = {}, None

    def activate(self, i: int) -> None:
        """Make expert ``i`` the one a whole-batch ``run_expert`` calls: in eval mode (with ``merge``
        on) merged, else as separate LoRA branches."""
        if self.merge and not self.training:
            self.merge_expert(i)
        else:
            self.select(i)

    def train(self, mode: bool = True) -> LoRAExperts:
        if mode:
            self.unmerge()  # adapters train as separate branches
        super().train(mode)
        return self

    def _apply(self, fn, recurse=True):
        self.unmerge()  # a move or cast acts on the backbone's own weights (the merge is redone at the next call)
        return super()._apply(fn, recurse)

    def state_dict(self, *args, **kwargs):
        self.unmerge()  # the backbone's own weights, never a merged copy
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.unmerge()
        return super().load_state_dict(*args, **kwargs)

    def run_expert(self, i: int, x: Tensor, *, whole_batch: bool = True) -> Tensor:
        if whole_batch:
            self.activate(i)
        else:
            self.select(i)
        return self.guide(x, net=self.guide.net)  # guide.net carries the injected adapters; it runs in the bank's mode

    def teacher(self, x: Tensor) -> Tensor:
        self.unmerge()
        modes = {m: m.training for m in self.model.modules()}  # restored exactly (shared BN included)
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.guide(x)
        finally:
            for m, mode in modes.items():
                m.training = mode

    def trainable_parameters(self, i: int) -> list[nn.Parameter]:
        tag = f".{expert_name(i)}."
        return [p for n, p in self.model.named_parameters() if tag in n]

    def expert_state(self, i: int) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        self.unmerge()
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=expert_name(i)).items()}

    def load_expert_state(self, i: int, state: dict[str, Tensor]) -> None:
        from peft import set_peft_model_state_dict

        self.unmerge()
        result = set_peft_model_state_dict(self.model, state, adapter_name=expert_name(i))
        if result.unexpected_keys:
            raise PPAPError(f"adapter weights do not fit the model (unexpected {result.unexpected_keys[:3]})")

    def base_state(self) -> dict[str, Tensor]:
        self.unmerge()
        skip = ("lora_", "modules_to_save")
        return {k: v for k, v in self.model.state_dict().items() if not any(s in k for s in skip)}

    def save_expert(self, i: int, directory: str | os.PathLike) -> list[Path]:
        """Write ``directory/expert_i/{adapter_config.json, adapter_model.safetensors}`` (peft layout)."""
        self.model.save_pretrained(str(directory), selected_adapters=[expert_name(i)], safe_serialization=True)
        (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing useful
        folder = Path(directory) / expert_name(i)
        files = [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
        for path in files:
            give_usual_permissions(path)  # peft saves through safetensors' save_file, which leaves 0600
        return files

    def load_expert(self, i: int, directory: str | os.PathLike) -> None:
        path = Path(directory) / expert_name(i)
        state = load_safetensors(path / "adapter_model.safetensors")  # one-line errors for missing/corrupt
        want = set(self.expert_state(i))
        legacy = "base_model.model.net."  # ppap-experts-v1 wrapped the model in a private "net" module
        if set(state) != want and all(k.startswith(legacy) for k in state):
            state = {"base_model.model." + k[len(legacy) :]: v for k, v in state.items()}
        if set(state) != want:
            extra = sorted(set(state) - want) or sorted(want - set(state))
            raise PPAPError(f"adapter {path} does not fit the guidance model (mismatched keys, e.g. {extra[0]})")
        try:
            self.load_expert_state(i, state)
        except RuntimeError as e:  # shape mismatch: another rank or another backbone
            raise PPAPError(f"adapter {path} does not fit the guidance model ({str(e).splitlines()[-1].strip()[:160]})") from None


class FullExperts(ExpertBank):
    """N fully fine-tuned copies (the supervised multi-expert / noise-aware baselines)."""

    def __init__(self, guide: nn.Module, router: TimestepRouter, adapter: AdapterConfig = AdapterConfig(kind="full")):
        super().__init__()
        self.router, self.adapter = router, adapter
        self.guide = as_guide_model(guide)
        net = self.guide.net.requires_grad_(False).eval()
        self.base_fingerprints = weights_fingerprints(net.state_dict())
        self.experts = nn.ModuleDict({expert_name(i): copy.deepcopy(net).requires_grad_(True) for i in range(router.num_experts)})

    def frozen_modules(self) -> list[nn.Module]:
        return [self.guide]

    def run_expert(self, i: int, x: Tensor, *, whole_batch: bool = True) -> Tensor:
        return self.guide(x, net=self.experts[expert_name(i)])

    def teacher(self, x: Tensor) -> Tensor:
        self.guide.eval()
        return self.guide(x)

    def trainable_parameters(self, i: int) -> list[nn.Parameter]:
        return list(self.experts[expert_name(i)].parameters())

    def expert_state(self, i: int) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.experts[expert_name(i)].state_dict().items()}

    def load_expert_state(self, i: int, state: dict[str, Tensor]) -> None:
        self.experts[expert_name(i)].load_state_dict(state, strict=True)

    def base_state(self) -> dict[str, Tensor]:
        return self.guide.net.state_dict()

    def save_expert(self, i: int, directory: str | os.PathLike) -> list[Path]:
        path = Path(directory) / expert_name(i) / "model.safetensors"
        atomic_save_safetensors(path, self.expert_state(i))
        return [path]

    def load_expert(self, i: int, directory: str | os.PathLike) -> None:
        load_weights_into(self.experts[expert_name(i)], Path(directory) / expert_name(i) / "model.safetensors")


def make_bank(guide: nn.Module, router: TimestepRouter, adapter: AdapterConfig, seed: int = 0) -> ExpertBank:
    if adapter.kind == "lora":
        return LoRAExperts(guide, router, adapter, seed=seed)
    return FullExperts(guide, router, adapter)


def parameter_report(bank: ExpertBank) -> dict[str, float]:
    """Trainable parameters of one expert, as a count and as a fraction of the backbone."""
    backbone = sum(v.numel() for k, v in bank.base_state().items() if v.is_floating_point() and "running_" not in k)
    per_expert = sum(p.numel() for p in bank.trainable_parameters(0))
    return {
        "backbone_parameters": backbone,
        "trainable_per_expert": per_expert,
        "fraction_per_expert": per_expert / backbone,
        "num_experts": bank.router.num_experts,
    }


# --------------------------------------------------------------------------------------------
# On disk: one folder per expert (peft's layout for LoRA) and ``ppap_experts.json`` beside them
# --------------------------------------------------------------------------------------------

MANIFEST = "ppap_experts.json"
FORMAT = "ppap-experts-v2"  # v2: adapters on the bare off-the-shelf model (v1 had a private "net." prefix)
OLD_FORMATS = ("ppap-experts-v1",)


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weights_fingerprints(state: dict[str, Tensor]) -> dict[str, str]:
    """A backbone's fingerprint at each precision a guide may run in: its weights' values in
    float32, and rounded to bfloat16 and to float16."""
    return {name: fingerprint(state, dtype) for name, dtype in PRECISIONS.items()}


def _precision(state: dict[str, Tensor]) -> str:
    """The precision a net computes in: "bfloat16" / "float16" when its weights are, else "float32"."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return next((name for name in ("bfloat16", "float16") if PRECISIONS[name] in dtypes), "float32")


def check_guide(state: dict[str, Tensor], manifest: dict, directory: Path) -> None:
    """Refuse a guide whose weights ``state`` are not those the experts in ``manifest`` were
    trained on, compared at the guide's precision: a half-precision guide against the trained
    guide's weights rounded alike (a bank trained in float32 loads on a bfloat16 or float16
    copy of its guide), a float32 guide at any precision the manifest records (a bank trained on
    a bfloat16 copy loads on the float32 original)."""
    recorded = {"float32": manifest["guide_fingerprint"]} | (manifest.get("guide_fingerprints") or {})
    own = _precision(state)
    # dtype None: the plain fingerprint (that of float32 weights; what manifests of float64 guides hold)
    tries = [(None, "float32"), (torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")]
    for dtype, precision in tries if own == "float32" else [(PRECISIONS[own], own)]:
        if precision in recorded and fingerprint(state, dtype) == recorded[precision]:
            return
    name = (manifest.get("guide") or {}).get("ref", "another model")
    if own not in recorded:
        raise PPAPError(
            f"experts in {directory} record no {own} fingerprint of their guide ({name}): load the guide in float32, "
            f"then cast it with the bank (bank.to(torch.{own}))"
        )
    raise PPAPError(
        f"experts in {directory} were trained on {name} (weights {str(recorded[own])[:12]}), "
        f"not on the given guidance model (weights {fingerprint(state, PRECISIONS[own])[:12]})"
    )


def schedule_fingerprint(schedule: NoiseSchedule) -> str:
    return fingerprint({"alphas_cumprod": schedule.alphas_cumprod})


def bank_manifest(bank: ExpertBank, task: Task, schedule: NoiseSchedule, **extra) -> dict:
    """The description of a bank that ``load_bank`` needs: router, adapter, task, the backbone
    and schedule it belongs to; ``trained`` (finished experts) and ``files`` (their sha256) are
    filled in as experts are saved."""
    return {
        "format": FORMAT,
        "boundaries": list(bank.router.boundaries),
        "adapter": asdict(bank.adapter),
        "task": asdict(task),  # type: ignore[call-overload]  # every Task is a dataclass
        "guide": bank.guide.identity,
        "guide_fingerprint": bank.base_fingerprint,
        "guide_fingerprints": {k: v for k, v in bank.base_fingerprints.items() if k != "float32"},
        "schedule": {"num_train_timesteps": schedule.num_train_timesteps, "fingerprint": schedule_fingerprint(schedule)},
        "trained": [],
        "files": {},
        "stats": {},
        "parameters": parameter_report(bank),
    } | extra


def record_expert(manifest: dict, bank: ExpertBank, i: int, directory: str | os.PathLike, stats: dict | None = None) -> dict:
    """Save expert i and note it (and its files' checksums) in ``manifest``; returns the manifest."""
    root = Path(directory)
    for path in bank.save_expert(i, root):
        manifest.setdefault("files", {})[path.relative_to(root).as_posix()] = file_sha256(path)
    manifest["trained"] = sorted(set(manifest["trained"]) | {expert_name(i)}, key=lambda n: int(n.split("_")[1]))
    if stats is not None:
        manifest["stats"][expert_name(i)] = stats
    return manifest


def save_bank(bank: ExpertBank, directory: str | os.PathLike, task: Task, schedule: NoiseSchedule, **extra) -> None:
    """Write every expert of ``bank`` and its manifest to ``directory`` (``load_bank`` reads it)."""
    manifest = bank_manifest(bank, task, schedule, **extra)
    for i in range(bank.router.num_experts):
        record_expert(manifest, bank, i, directory)
    atomic_write_json(Path(directory) / MANIFEST, manifest)


def load_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise PPAPError(f"experts directory not found: {directory}")
    manifest = read_json(directory / MANIFEST, "expert manifest")
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT,) + OLD_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PPAPError(f"{directory / MANIFEST} is not a ppap expert manifest (format {found!r}, expected {FORMAT!r})")
    return check_fields(manifest, f"expert manifest {directory / MANIFEST}", MANIFEST_SCHEMA)


MANIFEST_SCHEMA = {  # what load_bank reads; a damaged manifest is one line naming the field
    "boundaries": (list, lambda v: len(v) >= 2 and all(isinstance(b, int) for b in v), "a list of >= 2 timesteps"),
    "adapter": (dict,),
    "task": (dict, lambda v: isinstance(v.get("name"), str), "an object with a task name"),
    "guide_fingerprint": (str,),
    "guide_fingerprints": (dict, lambda v: all(isinstance(f, str) for f in v.values()), "of fingerprints", False),
    "schedule": (dict, lambda v: isinstance(v.get("fingerprint"), str), "an object with a fingerprint"),
    "trained": (list, lambda v: all(isinstance(n, str) for n in v), "a list of expert names"),
    "files": (dict, None, "", False),
    "default_scale": ((float, type(None)), None, "", False),
}


def load_bank(
    guide: nn.Module, directory: str | os.PathLike, *, schedule: NoiseSchedule | None = None, require_all: bool = True
) -> ExpertBank:
    """Rebuild the bank saved in ``directory`` on top of ``guide`` (the off-the-shelf model, weights
    loaded; its net receives the adapters). Checks that the guide and the schedule are the ones the
    experts were trained for, and every adapter file against its recorded checksum. The bank's
    ``task`` (and ``default_scale``, when recorded) come from the manifest."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    guide = as_guide_model(guide)
    try:
        router = TimestepRouter(tuple(manifest["boundaries"]))
        values: dict[str, Any] = {k: tuple(v) if k == "target_modules" and v else v for k, v in manifest["adapter"].items()}
        adapter = AdapterConfig(**values)
        task = make_task(**manifest["task"])
        trained, sched = list(manifest["trained"]), manifest["schedule"]
        if not isinstance(sched, dict) or not isinstance(trained, list):
            raise TypeError("schedule must be an object and trained a list")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, PPAPError):
            raise PPAPError(f"{directory / MANIFEST} is malformed ({e})") from None
        raise PPAPError(f"{directory / MANIFEST} is malformed ({type(e).__name__}: {e})") from None
    if schedule is not None and sched.get("fingerprint") != schedule_fingerprint(schedule):
        raise PPAPError(
            f"experts in {directory} were trained for another noise schedule "
            f"(T={sched.get('num_train_timesteps')}) than this diffusion model's (T={schedule.num_train_timesteps})"
        )
    check_guide(guide.net.state_dict(), manifest, directory)
    missing = [expert_name(i) for i in range(router.num_experts) if expert_name(i) not in trained]
    if missing and require_all:
        raise PPAPError(f"experts in {directory} are unfinished ({missing[0]} not trained); re-run `ppap train` to finish them")
    for rel, digest in (manifest.get("files") or {}).items():
        path = directory / rel
        if not path.is_file():
            raise PPAPError(f"expert file {path} is missing")
        if file_sha256(path) != digest:
            raise PPAPError(f"expert file {path} does not match its checksum in {MANIFEST} (damaged or replaced)")
    bank = make_bank(guide, router, adapter)
    for i in range(router.num_experts):
        if expert_name(i) in trained:
            bank.load_expert(i, directory)
    bank.task, bank.default_scale, bank.manifest = task, manifest.get("default_scale"), manifest
    return bank.eval()


BANK_FILES = ("*.json", "*.safetensors")  # the manifest and each expert's adapter config and weights


def bank_folder(ref: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """A bank's local folder: a folder as it is, else a zoo bank's, else a hub id's snapshot."""
    from . import hub, zoo

    if Path(ref).is_dir():
        return hub.subfolder_of(Path(ref), subfolder, str(ref))
    if zoo.is_zoo_name(str(ref)):
        return hub.subfolder_of(zoo.get(str(ref), "experts").location, subfolder, str(ref))
    if hub.is_hub_id(str(ref)):
        return hub.hub_folder(str(ref), BANK_FILES, revision=revision, subfolder=subfolder)
    forms = f"a folder written by `ppap train`, a zoo name ({hub.zoo_names('experts')}) or {hub.HUB_FORM}"
    raise hub.not_found(str(ref), "experts directory", forms)


def save_pretrained_bank(
    bank: ExpertBank, directory: str | os.PathLike, *, schedule: NoiseSchedule | None = None, task: Task | None = None
) -> None:
    """``save_bank`` with what the bank recorded: its task, and the schedule, statistics and
    trained experts of the manifest it was loaded from (``schedule`` is needed otherwise)."""
    loaded = bank.manifest or {}
    task = task or bank.task
    if task is None:
        raise PPAPError("save_pretrained needs task= (the bank was neither loaded from disk nor trained)")
    if schedule is not None:
        if loaded and loaded["schedule"].get("fingerprint") != schedule_fingerprint(schedule):
            raise PPAPError("save_pretrained: the given schedule is not the one the experts were trained for")
        manifest = bank_manifest(bank, task, schedule, stats=loaded.get("stats", {}))
    elif loaded:
        manifest = loaded | {"format": FORMAT, "task": asdict(task), "trained": [], "files": {}}  # type: ignore[call-overload]
    else:
        raise PPAPError("save_pretrained needs schedule= (the diffusion model's NoiseSchedule) for a bank not loaded from disk")
    if bank.default_scale is not None:
        manifest["default_scale"] = bank.default_scale
    trained = loaded.get("trained") or [expert_name(i) for i in range(bank.router.num_experts)]
    for i in range(bank.router.num_experts):
        if expert_name(i) in trained:
            record_expert(manifest, bank, i, directory)
    atomic_write_json(Path(directory) / MANIFEST, manifest)
