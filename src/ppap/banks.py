"""Banks of noise-range experts behind one routed call ``bank(x, t)``.

``LoRAExperts`` is PPAP proper: ONE frozen off-the-shelf network with N named peft LoRA adapters
(``expert_0`` ... ``expert_{N-1}``), switched with ``set_adapter``. ``FullExperts`` holds N full
copies, for the supervised baselines. Routing: ``ppap.router``; the disk format: ``ppap.bank_format``.

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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import bank_format
from .bank_format import expert_name, weights_fingerprints
from .diffusion import NoiseSchedule
from .guide_model import GuideModel
from .io import PPAPError
from .merging import held_elsewhere, merged_weight
from .router import TimestepRouter
from .tasks import Task

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


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

        folder = bank_format.bank_folder(pretrained, revision=revision, subfolder=subfolder)
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
        bank_format.save_pretrained_bank(self, save_directory, schedule=schedule, task=task)


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
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`: its warning is not ours to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(seed)
            self.model = get_peft_model(net, config, adapter_name=expert_name(0))
            for i in range(1, router.num_experts):
                self.model.add_adapter(expert_name(i), config)
        self._active = 0
        self.model.set_adapter(expert_name(0))
        self.merge = True  # eval mode, one expert serving a whole batch: run it merged (the cost of a plain forward)
        self._merged: int | None = None
        self._put_aside: dict[str, Tensor] = {}  # while merged: LoRA layer name -> the base weight its merged copy stands in for
        self._merge_buffers: dict[str, nn.Parameter] = {}  # LoRA layer name -> its merged weight's tensor (not in the state dict)

    def frozen_modules(self) -> list[nn.Module]:
        if self.adapter.per_expert_norm:
            return []
        return [m for m in self.model.modules() if isinstance(m, NORM_TYPES)]

    def _lora_layers(self) -> dict[str, Any]:  # peft LoraLayer modules
        from peft.tuners.lora import LoraLayer

        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def select(self, i: int) -> None:
        """Make expert ``i`` the active adapter (peft's ``set_adapter``), its LoRA as separate branches.
        peft's switch also makes that adapter trainable and the others frozen; every parameter's
        ``requires_grad`` is put back as it was (a training loop sets its own)."""
        self.unmerge()
        if i != self._active:
            flags = [(p, p.requires_grad) for p in self.model.parameters()]
            self.model.set_adapter(expert_name(i))
            for p, flag in flags:
                p.requires_grad_(flag)
            self._active = i

    def merge_expert(self, i: int) -> None:
        """Merge expert ``i``'s LoRA into the adapted layers' weights, so that a call costs one plain
        forward. Each layer's merged weight W + scaling * B A is written by one fused ``addmm``
        (``merged_weight``) into a tensor of the bank's own, reused from merge to merge; the
        layer's own weight is put aside (keyed by its module name) and put back, the very tensor,
        by ``unmerge``. The backbone's weights are never written, and a merged tensor that an
        autograd graph still holds is left to it (``_merge_buffer``), so every graph stays valid.
        A grouped conv keeps its LoRA branch (its delta is not a grouped kernel). Costs one extra
        copy of the adapted weights, kept in eval mode (``train()``, a move or a cast free it)."""
        if self._merged == i:
            return
        self.select(i)
        name = expert_name(i)
        with torch.no_grad():
            for layer_name, layer in self._lora_layers().items():
                base = layer.get_base_layer()
                if getattr(base, "groups", 1) > 1:  # peft's LoRA of a grouped conv crosses its groups: it runs as a branch
                    continue
                self._put_aside[layer_name] = base.weight
                out = self._merge_buffer(layer_name, base.weight)
                merged_weight(layer, name, out=out)
                base.weight = out
                layer.merged_adapters = [name]  # peft's forward then runs the base layer alone
        self._merged = i

    def _merge_buffer(self, name: str, like: Tensor) -> nn.Parameter:
        """The tensor that layer ``name``'s merged weight is written into: the one of the last
        merge (reusing it spares allocating, and page-faulting, a fresh copy of the weights at
        every switch), or a new one where that does not fit ``like`` or something else holds it
        (an autograd graph built on an earlier merge keeps the weights it saved)."""
        buf = self._merge_buffers.get(name)
        if buf is None or (buf.shape, buf.dtype, buf.device) != (like.shape, like.dtype, like.device) or held_elsewhere(buf):
            buf = self._merge_buffers[name] = nn.Parameter(
                torch.empty_like(like, memory_format=torch.contiguous_format), requires_grad=False
            )
        return buf

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
            self._merge_buffers = {}
        super().train(mode)
        return self

    def _apply(self, fn, recurse=True):
        self.unmerge()  # a move or cast acts on the backbone's own weights (the merge is redone at the next call)
        self._merge_buffers = {}
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
        return bank_format.save_lora_expert(self.model, i, directory)

    def load_expert(self, i: int, directory: str | os.PathLike) -> None:
        state = bank_format.read_lora_expert(i, directory, set(self.expert_state(i)))
        try:
            self.load_expert_state(i, state)
        except RuntimeError as e:  # shape mismatch: another rank or another backbone
            path = Path(directory) / expert_name(i)
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
        return bank_format.save_full_expert(self.expert_state(i), i, directory)

    def load_expert(self, i: int, directory: str | os.PathLike) -> None:
        bank_format.load_full_expert(self.experts[expert_name(i)], i, directory)


def make_bank(guide: nn.Module, router: TimestepRouter, adapter: AdapterConfig, seed: int = 0) -> ExpertBank:
    if adapter.kind == "lora":
        return LoRAExperts(guide, router, adapter, seed=seed)
    return FullExperts(guide, router, adapter)


def load_bank(
    guide: nn.Module, directory: str | os.PathLike, *, schedule: NoiseSchedule | None = None, require_all: bool = True
) -> ExpertBank:
    """Rebuild the bank saved in ``directory`` on top of ``guide`` (the off-the-shelf model, weights
    loaded; its net receives the adapters). Checks that the guide and the schedule are the ones the
    experts were trained for, and every adapter file against its recorded checksum
    (``bank_format.read_bank``). The bank's ``task`` (and ``default_scale``, when recorded) come
    from the manifest."""
    guide = as_guide_model(guide)
    saved = bank_format.read_bank(directory, guide.net.state_dict(), schedule=schedule, require_all=require_all)
    try:
        adapter = AdapterConfig(**saved.adapter)
    except (TypeError, PPAPError) as e:
        raise bank_format.malformed(saved.directory, e) from None
    bank = make_bank(guide, saved.router, adapter)
    for i in range(saved.router.num_experts):
        if expert_name(i) in saved.trained:
            bank.load_expert(i, saved.directory)
    bank.task, bank.default_scale, bank.manifest = saved.task, saved.manifest.get("default_scale"), saved.manifest
    return bank.eval()
