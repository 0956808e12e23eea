"""``ppap bench scale``: guidance at the sizes people run, with random weights.

The published architectures in ``ppap.configs`` (DDPM-CIFAR10-32, DDPM-CelebA-HQ-256, an
ADM-style ImageNet-64 class-conditional UNet, an IF-stage-I-like text-conditional UNet; ResNet-50,
ViT-B/16, SegFormer-B0, DPT-Large) are written as random-weight model folders and loaded through
ppap's own loaders, as a user's models are. Per (diffusion, guide) pair and batch size:

* the median time of one mid-noise DDIM step, unguided / naive / PPAP (5 default experts) / x0;
* that step taken apart: UNet forward, UNet forward + backward (what x0 adds), the guide's
  forward + backward at its own input size, the resizing (forward + backward), and one expert
  switch of the bank (unmerge + merge), so that every ratio is explained by its parts;
* the peak memory of each method, each in a fresh process (CPU: the peak resident set while two
  steps run; CUDA: ``torch.cuda.max_memory_allocated``);
* one expert-training step (time, memory) and the bank's size on disk against N full copies;
* per unconditional diffusion model, corpus throughput: ppap's ``generate`` against diffusers'
  ``DDIMPipeline`` on the same UNet, steps and batch.

Weights are random: times and memory do not depend on them (accuracy is not measured here).
Every measurement is a stage file under ``out/stages``, so an interrupted run resumes.
The measurements themselves are ``bench.scale_measurements``; this module runs them (each a stage)
and writes the report and the figure.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configs import ARCHITECTURES, build_model_folder, count_parameters
from ..io import PPAPError
from .common import Bench, _savefig, in_fresh_process, machine, machine_in_order, pyplot, stage_times
from .scale_measurements import (
    METHODS,
    build_bank,
    measure_memory,
    measure_throughput,
    measure_times,
    measure_train_step,
    measure_x0_memory,
)

# every diffusion model and every guide at least once; the guide's task decides the target kind
PAIRS = (
    ("ddpm-cifar10-32", "resnet-50"),
    ("ddpm-cifar10-32", "vit-base-patch16-224"),
    ("adm-imagenet-64", "resnet-50"),
    ("ddpm-celebahq-256", "segformer-b0-ade-512"),
    ("if-i-m-64", "dpt-large"),
)
# the expert-training step in micro-batches of this many samples (TrainConfig.micro_batch): a
# ViT-L backbone at 384x384 keeps the activations of 8 samples for the backward, over 23 GiB
TRAIN_MICRO_BATCH = {"dpt-large": 2}


@dataclass(frozen=True)
class ScaleBenchConfig:
    pairs: tuple = PAIRS  # (diffusion, guide) architectures of ppap.configs
    batch_sizes: tuple = ()  # empty: (1, 8) on the CPU, (1, 16, 64) on a GPU
    device: str = "cpu"
    dtype: str = "float32"  # the UNet's and the guide's dtype (the sampler state and gradients stay float32)
    steps: int = 25  # DDIM steps: the grid the mid-noise step is taken from, and the throughput runs
    repeats: int = 3  # timed rounds per measurement, after one warm-up round
    experts: str = "5"  # the bank's experts (TrainConfig's default recipe otherwise: LoRA rank 32)
    train_batch: int = 8  # batch of the timed expert-training step
    throughput_num: int = 8  # images per corpus-throughput run (one batch)
    throughput_steps: int = 10  # DDIM steps of each throughput run
    fresh_processes: bool | None = None  # each measurement in its own process; None: on the CPU only (CUDA's peak resets)


QUICK = ScaleBenchConfig(
    pairs=(("ddpm-cifar10-32", "resnet-50"),),
    batch_sizes=(1,),
    steps=4,
    repeats=1,
    train_batch=1,
    throughput_num=1,
    throughput_steps=2,
    fresh_processes=False,
)


def scale_config(
    quick: bool = False, device: str | None = None, dtype: str | None = None, batch_sizes: tuple[int, ...] | None = None
) -> ScaleBenchConfig:
    """The configuration of ``ppap bench scale [--quick] [--device] [--dtype] [--batch-sizes 1,8]``."""
    cfg = QUICK if quick else ScaleBenchConfig()
    if batch_sizes is not None and (not batch_sizes or min(batch_sizes) < 1):
        raise PPAPError(f"bad --batch-sizes {','.join(map(str, batch_sizes))!r}: every size must be >= 1")
    sizes = cfg.batch_sizes if batch_sizes is None else batch_sizes
    return dataclasses.replace(cfg, device=device or cfg.device, dtype=dtype or cfg.dtype, batch_sizes=sizes)


def batch_sizes(cfg: ScaleBenchConfig) -> tuple[int, ...]:
    if cfg.batch_sizes:
        return tuple(cfg.batch_sizes)
    return (1, 8) if torch.device(cfg.device).type == "cpu" else (1, 16, 64)


def pair_name(diffusion: str, guide: str) -> str:
    return f"{diffusion}+{guide}"


class ScaleBench(Bench):
    """Bench's stage / timing layer without its zoo models: this bench loads only the folders it
    builds under ``out/models``."""

    def __init__(self, cfg: ScaleBenchConfig, out: Path, progress: bool = True, report_only: bool = False):
        self.report_only = report_only  # measure nothing: the report of the stages finished so far
        for d, g in cfg.pairs:
            for name, kind in ((d, "diffusion"), (g, "guide")):
                if name not in ARCHITECTURES or ARCHITECTURES[name].kind != kind:
                    valid = ", ".join(a.name for a in ARCHITECTURES.values() if a.kind == kind)
                    raise PPAPError(f"unknown {kind} architecture {name!r}; valid: {valid}")
        from ..loading import resolve_device, resolve_dtype

        resolve_device(cfg.device), resolve_dtype(cfg.dtype)  # one-line errors (no CUDA here, a bad name) before anything runs
        if any(not isinstance(b, int) or b < 1 for b in batch_sizes(cfg)):
            raise PPAPError(f"batch sizes must be integers >= 1, got {list(cfg.batch_sizes)}")
        self._open(cfg, out, progress)
        self.errors: dict[str, str] = {}
        # the CPU's peak resident set cannot be reset below what a process ever held, so each
        # measurement runs in a new process there; CUDA's allocator peak is reset per measurement
        self.fresh = cfg.fresh_processes if cfg.fresh_processes is not None else torch.device(cfg.device).type == "cpu"

    def folder(self, name: str) -> str:
        return str(build_model_folder(name, self.out / "models" / name))

    def measure(self, name: str, fn: Callable, *args) -> dict | None:
        """Stage ``name``: ``fn(*args)`` in a fresh process (``fresh_processes``), saved; a failure is noted in the
        report (and retried by the next run), not fatal to the other measurements."""
        if self.report_only and not self.stage.exists(name):
            self.errors[name] = "not measured (--report-only)"
            return None
        try:
            return self.stage.get(name, lambda: in_fresh_process(fn, *args) if self.fresh else fn(*args))
        except Exception as e:
            self.errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if self.progress:
                print(f"{name}: {self.errors[name]}")
            return None

    def pair_stage(self, diffusion: str, guide: str) -> dict:
        cfg = self.cfg
        d_dir, g_dir = self.folder(diffusion), self.folder(guide)
        bank_dir = str(self.out / "banks" / pair_name(diffusion, guide))
        key = pair_name(diffusion, guide)
        out: dict[str, Any] = {"bank": self.measure(f"{key}-bank", build_bank, d_dir, g_dir, bank_dir, cfg.experts)}
        if out["bank"] is None:
            return out
        micro = TRAIN_MICRO_BATCH.get(guide, 0) if cfg.train_batch > TRAIN_MICRO_BATCH.get(guide, 0) else 0
        out["train"] = self.measure(
            f"{key}-train", measure_train_step, d_dir, g_dir, cfg.device, cfg.dtype, cfg.train_batch, cfg.repeats, micro
        )
        for b in batch_sizes(cfg):
            row: dict[str, Any] = {
                "seconds": self.measure(
                    f"{key}-b{b}-time", measure_times, d_dir, g_dir, bank_dir, cfg.device, cfg.dtype, b, cfg.steps, cfg.repeats
                )
            }
            memory = {}
            for m, (gd, bd) in {"unguided": (None, None), "naive": (g_dir, None), "ppap": (g_dir, bank_dir)}.items():
                memory[m] = self.measure(f"{key}-b{b}-memory-{m}", measure_memory, d_dir, gd, bd, cfg.device, cfg.dtype, b, cfg.steps)
            memory["x0"] = self.measure(f"{key}-b{b}-memory-x0", measure_x0_memory, d_dir, g_dir, cfg.device, cfg.dtype, b, cfg.steps)
            row["memory"] = memory
            out[f"b{b}"] = row
        return out

    def pair_stages(self, key: str) -> list[str]:
        names = [f"{key}-bank", f"{key}-train"]
        for b in batch_sizes(self.cfg):
            names += [f"{key}-b{b}-time"] + [f"{key}-b{b}-memory-{m}" for m in METHODS]
        return names

    def throughput_models(self) -> list[str]:
        """The unconditional diffusion models of the pairs (DDIMPipeline passes no class labels
        or prompt embeddings); on the CPU only those up to 64x64: the 256x256 one's runs would
        take about 20 minutes of a 2-core machine for a ratio that the 32x32 one already gives
        (both pipelines spend their time in the same UNet calls)."""
        models = dict.fromkeys(d for d, _ in self.cfg.pairs)
        cpu = torch.device(self.cfg.device).type == "cpu"
        return [
            d
            for d in models
            if json_config(d)["_class_name"] == "UNet2DModel"
            and not json_config(d).get("num_class_embeds")
            and not (cpu and int(json_config(d)["sample_size"]) > 64)
        ]

    def throughput_stage(self) -> dict:
        cfg, out = self.cfg, {}
        for d in self.throughput_models():
            out[d] = self.measure(
                f"{d}-throughput",
                measure_throughput,
                self.folder(d),
                cfg.device,
                cfg.dtype,
                cfg.throughput_num,
                cfg.throughput_steps,
                cfg.repeats,
            )
        return out

    def _run(self) -> dict:
        t0 = time.time()
        pairs = {}
        for d, g in self.cfg.pairs:
            key = pair_name(d, g)
            pairs[key] = self.timed_parts(key, lambda d=d, g=g: self.pair_stage(d, g), self.pair_stages(key))
        throughput = self.timed_parts("throughput", self.throughput_stage, [f"{d}-throughput" for d in self.throughput_models()])
        names = sorted({n for p in self.cfg.pairs for n in p})
        results = {
            "config": dataclasses.asdict(self.cfg),
            "machine": machine() | {"device": self.cfg.device, "dtype": self.cfg.dtype},
            "architectures": {n: {"source": ARCHITECTURES[n].source, "parameters": count_parameters(n)} for n in names},
            "batch_sizes": list(batch_sizes(self.cfg)),
            "pairs": pairs,
            "throughput": throughput,
            "errors": self.errors,
            "stage_seconds": self.timings,
            "seconds_this_call": round(time.time() - t0, 1),
        }
        results["targets"] = targets(results)
        self.save_results(results, scale_report(results))
        figure(results, self.out / "bench_scale.png")
        return results


def json_config(name: str) -> dict:
    from ..configs import config_dir
    from ..io import read_json

    return read_json(config_dir(name) / "unet_config.json", f"{name} UNet config")


# --------------------------------------------------------------------------------------------
# targets, report, figure
# --------------------------------------------------------------------------------------------


def _ppap_over_naive(seconds: dict, steps: int, experts: int) -> float | None:
    """PPAP's step over naive's, with the bank's expert switches spread over the trajectory
    (at most experts - 1 switches in ``steps`` steps); None where one ran out of memory."""
    if any(seconds.get(k) is None for k in ("ppap", "naive", "expert_switch")):
        return None
    ppap = seconds["ppap"] + seconds["expert_switch"] * (min(experts, steps) - 1) / steps
    return ppap / seconds["naive"]


def targets(r: dict) -> dict:
    """The stated targets as ratios from this run: PPAP <= 1.05x naive at every size; a 5-expert
    bank < 2 copies of its guide on disk; corpus throughput >= 0.95x diffusers'."""
    cfg, ratios, banks, thr = r["config"], [], [], []
    experts = int(cfg["experts"]) if str(cfg["experts"]).isdigit() else 5
    for p in r["pairs"].values():
        if p.get("bank"):
            banks.append(p["bank"]["bank_over_guide"])
        for b in r["batch_sizes"]:
            s = (p.get(f"b{b}") or {}).get("seconds")
            ratio = _ppap_over_naive(s, cfg["steps"], experts) if s else None
            if ratio is not None:
                ratios.append(ratio)
    thr = [t["ratio"] for t in r["throughput"].values() if t]
    worst = lambda v, f: None if not v else round(f(v), 3)  # noqa: E731
    out = {
        "ppap_over_naive_max": worst(ratios, max),
        "bank_over_guide_max": worst(banks, max),
        "throughput_over_diffusers_min": worst(thr, min),
    }
    out["met"] = {
        "ppap_le_1.05x_naive": None if out["ppap_over_naive_max"] is None else out["ppap_over_naive_max"] <= 1.05,
        "bank_lt_2_guides": None if out["bank_over_guide_max"] is None else out["bank_over_guide_max"] < 2,
        "throughput_ge_0.95x": None if out["throughput_over_diffusers_min"] is None else out["throughput_over_diffusers_min"] >= 0.95,
    }
    return out


def _train_batch(train: dict) -> str:
    micro = train.get("micro_batch") or 0
    return f"{train.get('batch', '')}, micro-batches of {micro}" if micro else str(train.get("batch", ""))


def _f(v, fmt: str = ".3f") -> str:
    return "" if v is None else format(v, fmt)


def _times(ratio: float | None) -> str:
    return "" if ratio is None else f" ({ratio:.2f}x)"


def _memory_method(r: dict) -> str:
    cuda = torch.device(r["config"]["device"]).type == "cuda"
    fresh = r["config"]["fresh_processes"]
    if fresh is None:
        fresh = not cuda
    where = "each method in a fresh process" if fresh else "in one process, the peak reset before each method"
    return f"{where}, {'CUDA allocator peak' if cuda else 'peak resident set while two steps run'}"


def scale_report(r: dict) -> str:
    cfg, experts = r["config"], int(r["config"]["experts"]) if str(r["config"]["experts"]).isdigit() else 5
    lines = [
        f"Machine: {machine_in_order(r)}. Random weights; one mid-noise step of DDIM-{cfg['steps']} per method (median of "
        f"{cfg['repeats']} round-robin rounds after a warm-up); memory: {_memory_method(r)}.",
        "",
        "Architectures: " + ", ".join(f"{n} ({a['parameters'] / 1e6:.1f}M)" for n, a in r["architectures"].items()),
        "",
        "| pair | batch | unguided s | naive s | PPAP s (x naive) | x0 s (x naive) | UNet fwd | UNet fwd+bwd | guide fwd+bwd | resize fwd+bwd "
        "| expert switch | peak MiB unguided / naive / PPAP / x0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in r["pairs"].items():
        for b in r["batch_sizes"]:
            row = p.get(f"b{b}") or {}
            s, mem = row.get("seconds"), row.get("memory") or {}
            peaks = " / ".join(_f((mem.get(m) or {}).get("peak_mib"), ".0f") or "-" for m in METHODS)
            if not s:
                lines.append(f"| {name} | {b} | failed |  |  |  |  |  |  |  |  | {peaks} |")
                continue
            v = lambda k, fmt=".3f", s=s: "out of memory" if s.get(k) is None else format(s[k], fmt)  # noqa: E731
            ppap_ratio = _ppap_over_naive(s, cfg["steps"], experts)
            x0_ratio = None if s.get("x0") is None or s.get("naive") is None else s["x0"] / s["naive"]
            lines.append(
                f"| {name} | {b} | {v('unguided')} | {v('naive')} | {v('ppap')}{_times(ppap_ratio)} | "
                f"{v('x0')}{_times(x0_ratio)} | {v('unet_forward')} | {v('unet_forward_backward')} | "
                f"{v('guide_forward_backward')} | {v('resize_forward_backward', '.4f')} | {v('expert_switch', '.4f')} | {peaks} |"
            )
    lines += [
        "",
        "Parts: naive ~ UNet fwd + resize + guide fwd+bwd; x0 ~ UNet fwd+bwd + resize + guide fwd+bwd; PPAP ~ naive, plus "
        f"{min(experts, cfg['steps']) - 1} expert switches per trajectory (in the PPAP ratio, spread over {cfg['steps']} steps).",
        "",
        "| pair | bank of N experts MiB | guide MiB | N full copies MiB | bank / guide | train step s (batch) | train peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in r["pairs"].items():
        bank, train = p.get("bank") or {}, p.get("train") or {}
        lines.append(
            f"| {name} | {_f(bank.get('bank_mib'), '.1f')} | {_f(bank.get('guide_mib'), '.1f')} | {_f(bank.get('full_copies_mib'), '.1f')} | "
            f"{_f(bank.get('bank_over_guide'), '.2f')} | {_f(train.get('seconds_per_step'))} ({_train_batch(train)}) | "
            f"{_f(train.get('peak_mib'), '.0f')} |"
        )
    if r["throughput"]:
        lines += [
            "",
            "| diffusion | images | steps | ppap generate img/s | diffusers DDIMPipeline img/s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for d, t in r["throughput"].items():
            if t:
                lines.append(
                    f"| {d} | {t['num']} | {t['steps']} | {t['ppap_images_per_s']} | {t['diffusers_images_per_s']} | {t['ratio']:.3f} |"
                )
    tg = r["targets"]
    lines += [
        "",
        f"Targets: PPAP / naive at most {_f(tg['ppap_over_naive_max'], '.3f')} (<= 1.05: {tg['met']['ppap_le_1.05x_naive']}); "
        f"bank / guide at most {_f(tg['bank_over_guide_max'], '.2f')} (< 2: {tg['met']['bank_lt_2_guides']}); "
        f"throughput / diffusers at least {_f(tg['throughput_over_diffusers_min'], '.3f')} (>= 0.95: {tg['met']['throughput_ge_0.95x']}).",
    ]
    if r["errors"]:
        lines += ["", "Failed measurements (re-run to retry): " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items())]
    lines += ["", stage_times(r["stage_seconds"])]
    return "\n".join(lines) + "\n"


def figure(r: dict, path: Path) -> None:
    """Seconds per image of one step and peak memory against the diffusion model's resolution,
    per method, at the largest batch measured."""
    plt = pyplot()
    b = max(r["batch_sizes"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for m in METHODS:
        pts_t, pts_m = [], []
        for name, p in r["pairs"].items():
            res = int(json_config(name.split("+")[0])["sample_size"])
            row = p.get(f"b{b}") or {}
            if row.get("seconds") and row["seconds"].get(m) is not None:
                pts_t.append((res, row["seconds"][m] / b, name))
            peak = ((row.get("memory") or {}).get(m) or {}).get("peak_mib")
            if peak is not None:
                pts_m.append((res, peak / 1024, name))
        for ax, pts in ((ax_t, pts_t), (ax_m, pts_m)):
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=m, s=25)
            for res, y, name in pts if m == "naive" else ():  # which pair a column of points is
                ax.annotate(name.split("+")[1], (res, y), fontsize=6, xytext=(4, 0), textcoords="offset points")
    for ax, ylabel in ((ax_t, f"seconds per image per step (batch {b})"), (ax_m, f"peak memory GiB (batch {b})")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("diffusion resolution (pixels per side)")
        ax.set_ylabel(ylabel)
        if ax.collections:
            ax.legend(fontsize=7)
    fig.suptitle(f"ppap bench scale: {r['machine']['device']} {r['machine']['dtype']}", fontsize=9)
    _savefig(fig, path)


def run_scale_bench(
    out: Path, quick: bool = False, cfg: ScaleBenchConfig | None = None, progress: bool = True, report_only: bool = False
) -> dict:
    """Run (or resume) the bench in ``out``; ``report_only``: write the report and the figure
    of the stages finished so far, listing the others as not measured."""
    cfg = cfg or (QUICK if quick else ScaleBenchConfig())
    return ScaleBench(cfg, out, progress=progress, report_only=report_only).run()
