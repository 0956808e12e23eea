"""Configuration that the command line needs before any model loads: the training options
(``TrainConfig``) and the default guidance scale per task and method. It imports neither torch
nor numpy, so that ``ppap --help`` and every argument error return at once."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from .errors import PPAPError

if TYPE_CHECKING:
    from .banks import AdapterConfig

EXPERT_METHODS = ("ppap", "noise-aware", "multi-expert-supervised")  # the methods that call an expert bank
PARTICLE_METHODS = ("best-of-n", "fk", "tds", "ppap-smc", "ppap-fk")  # K particles per image (ppap.particles); scale = the exponent lambda
PARTICLE_EXPERT_METHODS = ("ppap-smc", "ppap-fk")  # the particle methods whose twist is the expert bank

DEFAULT_SCALES: dict[tuple[str, str], float] = {
    # (task, method) -> the guidance scale the zoo benchmarks chose (`make bench`, docs/results.md);
    # (dense losses are per-pixel means: their useful scales are 10-1000x a classifier's)
    ("classification", "naive"): 30.0,
    ("classification", "ppap"): 30.0,
    ("classification", "noise-aware"): 30.0,
    ("classification", "multi-expert-supervised"): 10.0,
    ("classification", "x0"): 1.0,
    ("classification", "x0-shortcut"): 1.0,
    # particle methods: the exponent lambda of p(y | x)^lambda (1 targets the exact conditional
    # p(x | y)); each the lambda `ppap bench search` measured best with 4x compute by the rule the
    # gradient benches choose scales with (the highest accuracy, then the lowest FID within 2
    # points): fk and tds of 1, 3, 10, 20, 30 on 100 samples, ppap-smc and ppap-fk on 300
    # (best-of-n: lambda changes nothing)
    ("classification", "best-of-n"): 1.0,
    ("classification", "fk"): 3.0,
    ("classification", "tds"): 3.0,
    ("classification", "ppap-smc"): 20.0,
    ("classification", "ppap-fk"): 20.0,
    ("segmentation", "naive"): 300.0,
    ("segmentation", "ppap"): 1000.0,
    ("segmentation", "x0"): 300.0,
    ("dense", "naive"): 3000.0,
    ("dense", "ppap"): 10000.0,
    ("dense", "x0"): 10000.0,
}


def default_scale(task: str, method: str) -> float:
    """The default guidance scale of ``method`` on ``task`` (``DEFAULT_SCALES``). Pairs the
    benchmarks did not sweep borrow the nearest measured one: the supervised banks take PPAP's
    scale, x0-shortcut takes x0's; a task of one's own takes classification's."""
    borrowed = "ppap" if method in EXPERT_METHODS else "x0" if method == "x0-shortcut" else method
    for key in ((task, method), (task, borrowed), ("classification", method)):
        if key in DEFAULT_SCALES:
            return DEFAULT_SCALES[key]
    return DEFAULT_SCALES[("classification", "ppap")]


def describe_default_scales() -> str:
    """``DEFAULT_SCALES`` in one line, for help texts."""
    tasks = dict.fromkeys(task for task, _ in DEFAULT_SCALES)
    return "; ".join(f"{task}: " + ", ".join(f"{m} {s:g}" for (t, m), s in DEFAULT_SCALES.items() if t == task) for task in tasks)


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "distill"  # "distill" (data-free PPAP) or "supervised" (needs labels)
    experts: str = "5"  # a count of equal timestep ranges, "logsnr:5" (equal log-SNR ranges), or "lo-hi,lo-hi,..."
    adapter: str = "lora"  # "lora" (one frozen net + N adapters) or "full" (N full copies)
    rank: int = 32  # LoRA rank (the best of 8 / 16 / 32 in the bench's ablation, docs/findings.md)
    alpha: float = 32.0  # LoRA alpha (update scaled by alpha / rank)
    per_expert_norm: bool = True  # each expert owns its norm layers (affine + running stats)
    iterations: int = 1000  # optimiser steps per expert
    batch_size: int = 64  # global batch, split across processes
    lr: float = 1e-3  # AdamW peak; linear warm-up then linear decay to 0, restarted per expert
    warmup: int = 20  # warm-up steps of each expert's schedule
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warm_start: bool = True  # start expert i from expert i-1's weights (the official code does; it wins, docs/findings.md)
    balance_classes: bool = False  # classification: draw the corpus so the teacher's pseudo-labels are uniform (no real labels)
    tau: float | None = None  # KD temperature on the teacher (None: the task's own, 1; the official code's 0.25 sharpens)
    seed: int = 0  # LoRA init, batches, t and noise are all drawn from it
    checkpoint_every: int = 100  # steps between resume checkpoints
    micro_batch: int = 0  # samples per forward + backward on each process (0: all of its share); gradients add up to the batch's

    def __post_init__(self):
        for f in fields(self):  # types first: a config file can hold anything
            value, want = getattr(self, f.name), type(f.default) if f.default is not None else float
            ok = (
                isinstance(value, bool)
                if want is bool
                else (value is None and f.default is None)
                or (isinstance(value, (int, float) if want is float else want) and not isinstance(value, bool))
            )
            if not ok:
                raise PPAPError(f"training option {f.name} must be {want.__name__}, got {value!r}")
        if self.objective not in ("distill", "supervised"):
            raise PPAPError(f"unknown objective {self.objective!r}; valid: 'distill', 'supervised'")
        if self.micro_batch < 0:
            raise PPAPError(f"micro_batch must be >= 0 (0: the whole batch), got {self.micro_batch}")
        for name in ("iterations", "batch_size", "rank", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise PPAPError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, lo in (("lr", 0.0), ("alpha", 0.0), ("tau", 0.0), ("weight_decay", None)):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or (lo is not None and v <= lo) or v < 0):
                raise PPAPError(f"{name} must be a finite number {'> 0' if lo is not None else '>= 0'}, got {v}")
        if self.warmup < 0:
            raise PPAPError(f"warmup must be >= 0, got {self.warmup}")

    def adapter_config(self) -> AdapterConfig:
        from .banks import AdapterConfig  # here: this module stays free of torch

        return AdapterConfig(kind=self.adapter, rank=self.rank, alpha=self.alpha, per_expert_norm=self.per_expert_norm)
