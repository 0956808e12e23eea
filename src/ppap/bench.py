"""``ppap bench classifier``: the paper's comparison on the zoo, side by side in one run.

Stages (each saved under ``out/`` and skipped when re-run, so a killed bench resumes):
  1. corpus   unlabelled DDIM samples of the DDPM (shared with the zoo recipes)
  2. banks    every trained guide, by the one training loop: noise-aware (1 full copy, labels),
              multi-expert-supervised-5 (5 full copies, labels), PPAP-1/5/10 (LoRA, data-free)
  3. cost     one guided DDIM step per method vs an unguided one (timed round-robin), and the
              memory a guided step adds (each method in a fresh process)
  4. sweep    guidance scale per method on a separate seed set: accuracy and FID per scale
  5. main     every row on the same initial noises and balanced targets at its chosen scale:
              evaluator accuracy, FID / KID / precision / recall against the real test set
  6. noise    accuracy on noised real test images vs t (the paper's Sec. 3 analysis)
  7. ablate   small PPAP variants (experts, rank, corpus, tau, warm start, log-SNR ranges)
Then ``results.json``, ``report.md`` and the two plots.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import FASHION_MNIST_CLASSES, load_corpus, load_fashion_mnist, open_corpus, uint8_to_unit
from .experts import TimestepRouter, expert_name, make_bank, parameter_report
from .guidance import Calibration
from .io import PPAPError, atomic_write_bytes, atomic_write_json, read_json
from .metrics import accuracy_under_noise, features, fid, kid, precision_recall
from .pipeline import (corpus_spec, generate_corpus, guide_builder, load_diffusion, load_guide, sample_images, task_for,
                       to_hwc_uint8)
from .train import TrainConfig, load_experts, load_manifest, train_experts


@dataclass(frozen=True)
class Row:
    name: str  # the table's row label
    method: str  # guidance.METHODS key
    bank: str | None = None  # key into BenchConfig.banks
    calibration: Calibration = field(default_factory=Calibration)


@dataclass(frozen=True)
class BankSpec:
    train: TrainConfig
    data: str  # "corpus" (data-free) or "labelled" (real training images with labels)
    corpus_size: int | None = None  # use the first n corpus images (ablation)


CALIBRATED = Calibration(norm_temperature=2.0, softplus_beta=3.0, scale_schedule="sigma")
# the calibrated row is swept over these as well as over the scale (its best pair is used)
CALIBRATION_GRID = (
    Calibration(softplus_beta=3.0),
    Calibration(norm_temperature=2.0, softplus_beta=3.0),
    CALIBRATED,
)


def _banks(its: int) -> dict[str, BankSpec]:
    lora = dict(adapter="lora", rank=8, alpha=8, lr=1e-3, batch_size=64)
    full = dict(adapter="full", lr=5e-4, batch_size=64, objective="supervised")
    return {
        # ADM practice: one classifier over all t; same total optimiser steps as the 5 experts
        "noise-aware": BankSpec(TrainConfig(experts="1", iterations=5 * its, **full), "labelled"),
        "mes5": BankSpec(TrainConfig(experts="5", iterations=its, **full), "labelled"),
        "ppap1": BankSpec(TrainConfig(experts="1", iterations=its, **lora), "corpus"),
        "ppap5": BankSpec(TrainConfig(experts="5", iterations=its, **lora), "corpus"),
        "ppap10": BankSpec(TrainConfig(experts="10", iterations=its, **lora), "corpus"),
    }


ROWS = (
    Row("unguided", "unguided"),
    Row("naive", "naive"),
    Row("noise-aware", "noise-aware", "noise-aware"),
    Row("multi-expert-supervised-5", "multi-expert-supervised", "mes5"),
    Row("ppap-1", "ppap", "ppap1"),
    Row("ppap-5", "ppap", "ppap5"),
    Row("ppap-10", "ppap", "ppap10"),
    Row("x0", "x0"),
    Row("x0-shortcut", "x0-shortcut"),
    Row("x0-shortcut-calibrated", "x0-shortcut", calibration=CALIBRATED),
)


def _ablations(its: int) -> dict[str, tuple[str, BankSpec]]:
    """name -> (factor, bank). All at ``its`` steps per expert; the base is PPAP-5 defaults."""
    base = TrainConfig(experts="5", iterations=its, adapter="lora", rank=8, alpha=8, lr=1e-3, batch_size=64)
    r = dataclasses.replace
    return {
        "experts=1": ("experts", BankSpec(r(base, experts="1"), "corpus")),
        "experts=2": ("experts", BankSpec(r(base, experts="2"), "corpus")),
        "experts=5 (base)": ("experts", BankSpec(base, "corpus")),
        "experts=10": ("experts", BankSpec(r(base, experts="10"), "corpus")),
        "rank=2": ("rank", BankSpec(r(base, rank=2, alpha=2), "corpus")),
        "rank=32": ("rank", BankSpec(r(base, rank=32, alpha=32), "corpus")),
        "corpus=250": ("corpus", BankSpec(base, "corpus", corpus_size=250)),
        "corpus=1000": ("corpus", BankSpec(base, "corpus", corpus_size=1000)),
        "corpus=2000": ("corpus", BankSpec(base, "corpus", corpus_size=2000)),
        "tau=1": ("tau", BankSpec(r(base, tau=1.0), "corpus")),
        "warm start": ("warm start", BankSpec(r(base, warm_start=True), "corpus")),
        "equal log-SNR ranges": ("ranges", BankSpec(r(base, experts="logsnr:5"), "corpus")),
    }


@dataclass(frozen=True)
class BenchConfig:
    diffusion: str = "fashion-ddpm"
    guide: str = "fashion-classifier"
    evaluator: str = "fashion-evaluator"
    corpus_size: int = 4000  # data-free corpus (the zoo's fashion-ppap5 corpus)
    corpus_dir: str = "runs/corpus/fashion-ddpm-4000"  # shared with `ppap zoo train` ("" = inside out/)
    corpus_steps: int = 25  # DDIM steps of the corpus samples
    expert_iterations: int = 800  # optimiser steps per expert (noise-aware: 5x, one model)
    steps: int = 25  # DDIM steps
    per_class: int = 100  # main table: 10 x per_class samples per row
    sweep_per_class: int = 5  # scale sweep: samples per class and scale (separate seed)
    sweep_scales: dict = field(default_factory=lambda: {
        "naive": (3.0, 10.0, 30.0, 100.0), "noise-aware": (3.0, 10.0, 30.0, 100.0),
        "multi-expert-supervised": (3.0, 10.0, 30.0, 100.0), "ppap": (3.0, 10.0, 30.0, 100.0),
        "x0": (1.0, 3.0, 10.0, 30.0), "x0-shortcut": (1.0, 3.0, 10.0, 30.0)})
    noise_images: int = 2000  # real test images for the noise-vs-accuracy analysis
    noise_timesteps: tuple[int, ...] = (0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)
    ablation_iterations: int = 250  # steps per expert in the ablations
    ablation_per_class: int = 10  # guided samples per class for each ablation
    cost_batch: int = 64
    cost_repeats: int = 10
    cost_in_fresh_process: bool = True  # per-method peak memory needs a process of its own
    batch_size: int = 100  # sampling batch
    seed: int = 3000  # main table noises
    sweep_seed: int = 2000  # sweep noises (disjoint from the main table's)
    ablate: bool = True
    # independent jobs (corpus shards, banks, sweep / main rows, ablations) run in this many
    # processes, the cores split between them. On 2 CPU cores two single-threaded workers trained
    # the banks 1.7x faster than one two-threaded process and sampled 1.0-1.14x (docs/BENCHMARKS.md);
    # 1 = everything in this process (e.g. on a GPU).
    workers: int = 2


QUICK = BenchConfig(corpus_size=32, corpus_dir="", corpus_steps=2, expert_iterations=4, steps=3, per_class=2, sweep_per_class=1,
                    sweep_scales={"naive": (10.0, 30.0), "noise-aware": (10.0, 30.0), "multi-expert-supervised": (10.0, 30.0),
                                  "ppap": (10.0, 30.0), "x0": (3.0, 10.0), "x0-shortcut": (3.0, 10.0)},
                    noise_images=100, noise_timesteps=(0, 500, 999), ablation_iterations=2, ablation_per_class=1,
                    cost_batch=4, cost_repeats=1, cost_in_fresh_process=False, batch_size=20, workers=2)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class _Stage:
    """A JSON result per stage under ``out/stages``: computed once, then read back."""

    def __init__(self, out: Path):
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, compute):
        path = self.dir / f"{name}.json"
        if path.exists():
            return read_json(path, f"bench stage {name}")
        value = compute()
        atomic_write_json(path, value)
        return value

    def check_config(self, config: dict, ignore: tuple[str, ...] = ("workers",)) -> None:
        """A results folder belongs to one configuration: refuse to mix the stages of two."""
        path = self.dir / "config.json"
        config = json.loads(json.dumps(config))  # tuples -> lists, as read back
        if not path.exists():
            atomic_write_json(path, config)
            return
        old = read_json(path, "bench configuration")
        differ = sorted(k for k in set(old) | set(config) if k not in ignore and old.get(k) != config.get(k))
        if differ:
            raise PPAPError(f"{self.dir.parent} holds stages of another bench configuration ({', '.join(differ)} differ); "
                            "use another --out, or delete that folder to start over")


def _bank_seconds(directory: Path) -> float:
    m = load_manifest(directory)
    return round(sum(s["seconds"] for s in m["stats"].values()), 1)


def _choose(points: list[dict]) -> dict:
    """Highest evaluator accuracy; among points within 2 points of it, the lowest FID."""
    best = max(p["accuracy"] for p in points)
    return min((p for p in points if p["accuracy"] >= best - 0.02), key=lambda p: p["fid"])


class ClassifierBench:
    def __init__(self, cfg: BenchConfig, out: Path, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.stage = _Stage(self.out)
        self.stage.check_config(dataclasses.asdict(cfg))
        self.diffusion = load_diffusion(cfg.diffusion)
        self.evaluator = load_guide(cfg.evaluator).net
        self.naive = load_guide(cfg.guide)
        self.task = task_for(self.naive, self.diffusion.image_shape)
        self.classes = self.naive.classes or tuple(str(k) for k in range(self.task.num_classes))
        self.x_test, self.y_test = load_fashion_mnist("test")
        self.real_features = features(self.evaluator, self.x_test)
        self._banks: dict[str, object] = {}
        self._corpus = None
        self._pool: ProcessPoolExecutor | None = None

    # ---- data ------------------------------------------------------------------------------

    def _corpus_root_and_spec(self):
        root = Path(self.cfg.corpus_dir) if self.cfg.corpus_dir else self.out / "corpus"
        return root, corpus_spec(self.diffusion, self.cfg.diffusion, self.cfg.corpus_size, steps=self.cfg.corpus_steps)

    def corpus_shard(self, k: int) -> int:
        root, spec = self._corpus_root_and_spec()
        return generate_corpus(self.diffusion, root, spec, shards=[k], progress=False)

    def corpus_stage(self) -> None:
        """Draw the shards the corpus still lacks, a job each (the shards are the cache)."""
        root, spec = self._corpus_root_and_spec()
        missing = open_corpus(root, spec)
        self.jobs("corpus", {f"corpus-shard-{k}": ("corpus_shard", (k,)) for k in missing}, cache=False)

    def corpus(self) -> torch.Tensor:
        if self._corpus is None:
            self.corpus_stage()
            self._corpus = load_corpus(self._corpus_root_and_spec()[0])
        return self._corpus

    def bank_dir(self, key: str) -> Path:
        return self.out / "banks" / key

    def train_bank(self, key: str, spec: BankSpec):
        """Train (or resume, or just load) a bank with the one training loop."""
        guide = load_guide(self.cfg.guide)  # a fresh net per bank: LoRA is injected into it
        task = task_for(guide, self.diffusion.image_shape, tau=spec.train.tau)
        router = TimestepRouter.parse(spec.train.experts, self.diffusion.schedule.num_train_timesteps, self.diffusion.schedule.alphas_cumprod)
        bank = make_bank(guide.net, router, spec.train.adapter_config(), seed=spec.train.seed)
        labels = None
        if spec.data == "labelled":
            images, labels = load_fashion_mnist("train")
        else:
            images = self.corpus()[: spec.corpus_size]
        train_experts(bank, task, self.diffusion.schedule, images, spec.train, self.bank_dir(key), labels=labels,
                      identity=guide.identity, progress=self.progress)
        return bank.eval()

    def bank(self, key: str):
        if key not in self._banks:
            self._banks[key] = self.train_bank(key, _banks(self.cfg.expert_iterations)[key])
        return self._banks[key]

    # ---- sampling ----------------------------------------------------------------------------

    def builder(self, row: Row, scale: float):
        bank = self.bank(row.bank) if row.bank else None
        return guide_builder(row.method, task=self.task, scale=scale, guide=self.naive, experts=bank, diffusion=self.diffusion,
                             calibration=row.calibration)

    def run_row(self, row: Row, scale: float, per_class: int, seed: int, save: Path | None = None) -> dict:
        targets = torch.arange(self.task.num_classes).repeat_interleave(per_class)
        t0 = time.time()
        x = sample_images(self.diffusion, len(targets), seed=seed, make_guide=self.builder(row, scale), targets=targets,
                          steps=self.cfg.steps, batch_size=self.cfg.batch_size, progress=self.progress, desc=f"{row.name} s={scale:g}")
        seconds = time.time() - t0
        with torch.no_grad():
            pred = torch.cat([self.evaluator(x[k : k + 500]).argmax(-1) for k in range(0, len(x), 500)])
        feats = features(self.evaluator, x)
        out = {"scale": scale, "n": len(x), "accuracy": (pred == targets).float().mean().item(), "fid": fid(feats, self.real_features),
               "seconds": round(seconds, 1)}
        if save is not None:
            prec, rec = precision_recall(self.real_features[: len(x)], feats)
            out |= {"kid": kid(feats, self.real_features), "precision": prec, "recall": rec,
                    "per_class_accuracy": (pred == targets).float().view(self.task.num_classes, -1).mean(1).tolist()}
            buf = __import__("io").BytesIO()
            np.savez_compressed(buf, images=to_hwc_uint8(x), targets=targets.numpy())
            atomic_write_bytes(save, buf.getvalue())
        return out

    # ---- stages ------------------------------------------------------------------------------

    def bank_info(self, key: str) -> dict:
        """Train (or load) one bank of the main table and describe it."""
        spec = _banks(self.cfg.expert_iterations)[key]
        rep = parameter_report(self.bank(key))
        return {"train": dataclasses.asdict(spec.train), "data": spec.data, "train_seconds": _bank_seconds(self.bank_dir(key)),
                "trainable_parameters": int(rep["trainable_per_expert"] * rep["num_experts"]),
                "backbone_parameters": int(rep["backbone_parameters"]),
                "labelled_images": 60000 if spec.data == "labelled" else 0,
                "generated_images": self.cfg.corpus_size if spec.data == "corpus" else 0}

    def banks_stage(self) -> dict:
        self.corpus_stage()
        # longest first, so that two workers finish together
        keys = sorted(_banks(self.cfg.expert_iterations), key=lambda k: -_training_steps(_banks(1)[k].train))
        done = self.jobs("banks", {f"bank-{k}": ("bank_info", (k,)) for k in keys})
        return {k: done[f"bank-{k}"] for k in _banks(self.cfg.expert_iterations)}

    def cost_stage(self) -> dict:
        """Seconds per guided step, all methods timed round-robin in this process (a transient load
        hits every method alike); the memory a step adds, each method in a fresh process."""
        targets = torch.arange(self.cfg.cost_batch) % self.task.num_classes
        guides = {row.name: self.builder(row, 1.0)(targets) for row in ROWS}
        seconds = time_steps(self.diffusion, guides, self.cfg.cost_batch, self.cfg.steps, self.cfg.cost_repeats)
        rows = {}
        for row in ROWS:
            args = (self.cfg, row, str(self.bank_dir(row.bank)) if row.bank else None)
            if self.cfg.cost_in_fresh_process:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    memory = pool.submit(_step_memory, *args).result()
            else:
                memory = _step_memory(*args)
            rows[row.name] = {"seconds_per_step": round(seconds[row.name], 4), "batch": self.cfg.cost_batch,
                              "ratio_to_unguided": round(seconds[row.name] / seconds["unguided"], 2)} | memory
        return rows

    def sweep_row(self, row: Row) -> list[dict]:
        cals = CALIBRATION_GRID if row.calibration != Calibration() else (row.calibration,)
        return [self.run_row(dataclasses.replace(row, calibration=c), s, self.cfg.sweep_per_class, self.cfg.sweep_seed)
                | {"calibration": dataclasses.asdict(c)} for c in cals for s in self.cfg.sweep_scales[row.method]]

    def sweep_stage(self) -> dict:
        rows = sorted(ROWS[1:], key=_row_cost, reverse=True)
        done = self.jobs("sweep", {f"sweep-{row.name}": ("sweep_row", (row,)) for row in rows})
        return {row.name: done[f"sweep-{row.name}"] for row in ROWS[1:]}

    def main_row(self, row: Row, scale: float) -> dict:
        (self.out / "samples").mkdir(exist_ok=True)
        return self.run_row(row, scale, self.cfg.per_class, self.cfg.seed, save=self.out / "samples" / f"{row.name}.npz") | {
            "calibration": dataclasses.asdict(row.calibration)}

    def main_stage(self, sweep: dict) -> dict:
        jobs = {}
        for row in sorted(ROWS, key=_row_cost, reverse=True):
            scale, chosen = 0.0, row
            if row.method != "unguided":
                point = _choose(sweep[row.name])
                scale, chosen = point["scale"], dataclasses.replace(row, calibration=Calibration(**point["calibration"]))
            jobs[f"main-{row.name}"] = ("main_row", (chosen, scale))
        done = self.jobs("main", jobs)
        return {row.name: done[f"main-{row.name}"] for row in ROWS}

    def noise_stage(self) -> dict:
        x, y = self.x_test[: self.cfg.noise_images], self.y_test[: self.cfg.noise_images]
        ts = list(self.cfg.noise_timesteps)
        sched = self.diffusion.schedule
        off = self.naive.net
        out = {"timesteps": ts, "routed": {
            "off-the-shelf": accuracy_under_noise(lambda xt, t: off(xt), sched, x, y, ts),
            "noise-aware": accuracy_under_noise(self.bank("noise-aware"), sched, x, y, ts),
            "multi-expert-supervised-5": accuracy_under_noise(self.bank("mes5"), sched, x, y, ts),
            "ppap-5": accuracy_under_noise(self.bank("ppap5"), sched, x, y, ts),
            "ppap-10": accuracy_under_noise(self.bank("ppap10"), sched, x, y, ts)}, "per_expert": {}}
        for name, key in (("ppap-5", "ppap5"), ("multi-expert-supervised-5", "mes5")):
            bank = self.bank(key)
            out["per_expert"][name] = [
                {"range": list(bank.router.interval(i)),
                 "accuracy": accuracy_under_noise(lambda xt, t, i=i: bank.run_expert(i, xt), sched, x, y, ts)}
                for i in range(bank.router.num_experts)]
        return out

    def ablation(self, name: str, scale: float) -> dict:
        factor, spec = _ablations(self.cfg.ablation_iterations)[name]
        x, y = self.x_test[: self.cfg.noise_images], self.y_test[: self.cfg.noise_images]
        ts = [t for t in (100, 300, 500, 700) if t < self.diffusion.schedule.num_train_timesteps]
        key = "ablation-" + name.replace(" ", "-").replace("=", "").replace("(", "").replace(")", "")
        bank = self._banks[key] = self.train_bank(key, spec)
        noisy = accuracy_under_noise(bank, self.diffusion.schedule, x, y, ts)
        guided = self.run_row(Row(name, "ppap", key), scale, self.cfg.ablation_per_class, self.cfg.sweep_seed + 1)
        self._banks.pop(key)
        return {"factor": factor, "train": dataclasses.asdict(spec.train), "corpus_size": spec.corpus_size or self.cfg.corpus_size,
                "boundaries": list(bank.router.boundaries), "trainable_per_expert": int(parameter_report(bank)["trainable_per_expert"]),
                "train_seconds": _bank_seconds(self.bank_dir(key)), "noisy_accuracy": noisy,
                "noisy_accuracy_mean": sum(noisy.values()) / len(noisy), "guided_accuracy": guided["accuracy"],
                "guided_fid": guided["fid"], "guided_n": guided["n"]}

    def ablation_stage(self, scale: float) -> dict:
        names = list(_ablations(self.cfg.ablation_iterations))
        stage = {name: "ablation-" + name.replace(" ", "_") for name in names}
        order = sorted(names, key=lambda n: -_training_steps(_ablations(1)[n][1].train))
        done = self.jobs("ablations", {stage[n]: ("ablation", (n, scale)) for n in order})
        return {name: done[stage[name]] for name in names}

    # ---- parallel jobs -----------------------------------------------------------------------

    def jobs(self, desc: str, jobs: dict[str, tuple[str, tuple]], cache: bool = True) -> dict:
        """Run ``{stage name: (method, args)}`` (``getattr(self, method)(*args)``), each result
        saved as its own stage file (``cache``) so that a killed bench resumes; with
        ``cfg.workers`` > 1 in a pool of worker processes, in the given order (longest first)."""
        out = {name: read_json(self.stage.dir / f"{name}.json", f"bench stage {name}")
               for name in jobs if cache and (self.stage.dir / f"{name}.json").exists()}
        todo = {name: job for name, job in jobs.items() if name not in out}
        if self.cfg.workers <= 1 or len(todo) <= 1:
            for name, (method, args) in tqdm(todo.items(), desc=desc, unit="job", disable=not self.progress or len(todo) <= 1):
                out[name] = _run_job(self, name if cache else None, method, args)
            return {name: out[name] for name in jobs}
        pool = self._executor()
        futures = {pool.submit(_run_job, None, name if cache else None, method, args): name for name, (method, args) in todo.items()}
        for f in tqdm(as_completed(futures), total=len(futures), desc=f"{desc} ({self.cfg.workers} workers)", unit="job",
                      disable=not self.progress):
            out[futures[f]] = f.result()
        return {name: out[name] for name in jobs}

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            threads = max(1, (os.cpu_count() or 1) // self.cfg.workers)
            self._pool = ProcessPoolExecutor(self.cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.cfg, str(self.out), threads))
        return self._pool

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _run(self) -> dict:
        t0 = time.time()
        cfg = self.cfg
        # seconds of the call that computed each stage; a stage read back keeps its recorded time
        seconds_file = self.stage.dir / "seconds.json"
        timings = read_json(seconds_file, "bench stage times") if seconds_file.exists() else {}

        def timed(name, fn, cached=None):
            cached = (self.stage.dir / f"{name}.json").exists() if cached is None else cached
            t = time.time()
            value = self.stage.get(name, fn)
            if not cached or name not in timings:
                timings[name] = round(time.time() - t, 1)
                atomic_write_json(seconds_file, timings)
            return value

        banks = timed("banks", self.banks_stage)
        cost = timed("cost", self.cost_stage)
        sweep = timed("sweep", self.sweep_stage)
        main = timed("main", lambda: self.main_stage(sweep),
                     cached=all((self.stage.dir / f"main-{row.name}.json").exists() for row in ROWS))
        noise = timed("noise", self.noise_stage)
        ablations = timed("ablations", lambda: self.ablation_stage(main["ppap-5"]["scale"])) if cfg.ablate else {}
        results = {"config": dataclasses.asdict(cfg), "machine": machine(), "banks": banks, "cost": cost, "sweep": sweep,
                   "main": main, "noise": noise, "ablations": ablations, "stage_seconds": timings,
                   "seconds_this_call": round(time.time() - t0, 1),
                   "real_reference": self.stage.get("real", self.real_reference)}
        atomic_write_json(self.out / "results.json", results)
        atomic_write_bytes(self.out / "report.md", classifier_report(results).encode())
        plot_sweep(results, self.out / "bench_sweep.png")
        plot_noise(results, self.out / "bench_noise_accuracy.png")
        return results

    def real_reference(self) -> dict:
        """The same metrics for real training images: the floor a generator can reach."""
        x, y = load_fashion_mnist("train")
        n = self.task.num_classes * self.cfg.per_class
        feats = features(self.evaluator, x[:n])
        with torch.no_grad():
            acc = (self.evaluator(x[:n]).argmax(-1) == y[:n]).float().mean().item()
        prec, rec = precision_recall(self.real_features[:n], feats)
        return {"n": n, "accuracy": acc, "fid": fid(feats, self.real_features), "kid": kid(feats, self.real_features),
                "precision": prec, "recall": rec}


def _training_steps(train: TrainConfig) -> int:
    """Optimiser steps of a bank in all (``experts`` is "N", "logsnr:N" or explicit boundaries)."""
    spec = train.experts.split(":")[-1]
    return train.iterations * (int(spec) if spec.isdigit() else len(spec.split(",")))


def _row_cost(row: Row) -> float:
    """Relative sampling cost, to start the longest jobs first (x0 back-propagates through the UNet)."""
    return 3.0 if row.method == "x0" else 0.5 if row.method == "unguided" else 1.0


_WORKER: ClassifierBench | None = None  # a pool worker's own bench, made once by _init_worker


def _init_worker(cfg: BenchConfig, out: str, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = ClassifierBench(cfg, Path(out), progress=False)


def _run_job(bench: ClassifierBench | None, stage_name: str | None, method: str, args: tuple):
    bench = bench or _WORKER
    compute = lambda: getattr(bench, method)(*args)  # noqa: E731
    return bench.stage.get(stage_name, compute) if stage_name else compute()


def time_steps(diffusion, guides: dict, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds of one mid-noise DDIM step (of a ``steps``-step schedule) at ``batch`` for
    each guide (None = unguided), timed round-robin so that a transient load on the machine hits
    every method alike. Round 0 warms up and is dropped."""
    from .samplers import sample_ddim

    x = torch.randn((batch,) + diffusion.image_shape, generator=torch.Generator().manual_seed(0))
    ts = diffusion.schedule.timesteps(steps)
    step = ts[len(ts) // 2 : len(ts) // 2 + 1]
    times: dict[str, list[float]] = {name: [] for name in guides}
    for r in range(repeats + 1):
        for name, guide in guides.items():
            t0 = time.perf_counter()
            sample_ddim(diffusion, x, step, guide=guide)
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _step_memory(cfg: BenchConfig, row: Row, bank_dir: str | None) -> dict:
    """In a fresh process: the peak RSS of two guided steps above the RSS just before them
    (``step_memory_mib``; the load-time peak would hide everything but x0), and the process's
    peak RSS. Linux only for the step memory (None elsewhere)."""
    from .guidance import GuideSpec, build_guide
    from .samplers import sample_ddim

    diffusion = load_diffusion(cfg.diffusion)
    guide = load_guide(cfg.guide)
    task = task_for(guide, diffusion.image_shape)
    bank = None
    if bank_dir:
        bank, _ = load_experts(load_guide(cfg.guide).net, bank_dir, schedule=diffusion.schedule)
    targets = torch.arange(cfg.cost_batch) % task.num_classes
    x = torch.randn((cfg.cost_batch,) + diffusion.image_shape, generator=torch.Generator().manual_seed(0))
    ts = diffusion.schedule.timesteps(cfg.steps)
    g = build_guide(row.method, GuideSpec(task=task, target=targets, scale=1.0, net=guide.net, experts=bank, diffusion=diffusion,
                                          calibration=row.calibration))
    load_peak = _proc_status_mib("VmHWM")  # this process's own peak (ru_maxrss would carry the parent's over exec)
    before = _reset_peak_rss()
    for _ in range(2):
        sample_ddim(diffusion, x, ts[len(ts) // 2 : len(ts) // 2 + 1], guide=g)
    if before is None or load_peak is None:
        scale = 1024 if sys.platform != "darwin" else 1  # ru_maxrss is KiB on Linux, bytes on macOS
        return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1), "step_memory_mib": None}
    step_peak = _proc_status_mib("VmHWM")
    return {"peak_rss_mib": round(max(load_peak, step_peak), 1), "step_memory_mib": round(step_peak - before, 1)}


def _proc_status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float | None:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs) and return the current RSS
    in MiB; None where that is not possible (then only the process-wide peak is reported)."""
    try:  # hand freed heap back first, so that memory the allocator kept does not hide the next peak
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_mib("VmRSS")


def machine() -> dict:
    import os
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------------------------
# report and plots
# --------------------------------------------------------------------------------------------


def classifier_report(r: dict) -> str:
    cfg, main, banks, cost = r["config"], r["main"], r["banks"], r["cost"]
    bank_of = {row.name: row.bank for row in ROWS}
    lines = [f"Machine: {r['machine']}. DDIM-{cfg['steps']}, {10 * cfg['per_class']} samples per row (balanced over the 10 classes), "
             f"same initial noises for every row; scale chosen per method on a separate seed set.", "",
             "| method | scale | accuracy | FID | KID | precision | recall | trainable params | labelled images | train time (s) | step cost (x unguided) | memory: step / peak (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in main.items():
        b = banks.get(bank_of.get(name) or "", {})
        lines.append(f"| {name} | {m['scale']:g} | {m['accuracy']:.1%} | {m['fid']:.2f} | {m['kid']:.3f} | {m['precision']:.2f} | "
                     f"{m['recall']:.2f} | {b.get('trainable_parameters', 0):,} | {b.get('labelled_images', 0):,} | "
                     f"{b.get('train_seconds', 0):.0f} | {cost[name]['ratio_to_unguided']:.2f} | {_memory(cost[name])} |")
    real = r["real_reference"]
    lines.append(f"| *real training images* | | {real['accuracy']:.1%} | {real['fid']:.2f} | {real['kid']:.3f} | {real['precision']:.2f} | {real['recall']:.2f} | | | | | |")
    cal = main["x0-shortcut-calibrated"].get("calibration")
    if cal:
        lines.append(f"\nx0-shortcut-calibrated uses {_short(cal)} (best of {len(CALIBRATION_GRID)} calibrations x scales in the sweep).")
    p5, mes, nv = main["ppap-5"]["accuracy"], main["multi-expert-supervised-5"]["accuracy"], main["naive"]["accuracy"]
    lines += ["", f"PPAP-5 accuracy / multi-expert-supervised-5: {p5 / max(mes, 1e-9):.2f}; PPAP-5 / naive: {p5 / max(nv, 1e-9):.2f}; "
              f"trainable parameters PPAP-5 / multi-expert-supervised-5: "
              f"{banks['ppap5']['trainable_parameters'] / banks['mes5']['trainable_parameters']:.3f}.", ""]
    lines += ["Noise vs accuracy (real test images noised to t):", "", "| model | " + " | ".join(f"t={t}" for t in r["noise"]["timesteps"]) + " |",
              "|---" * (len(r["noise"]["timesteps"]) + 1) + "|"]
    for name, acc in r["noise"]["routed"].items():
        lines.append(f"| {name} | " + " | ".join(f"{acc[str(t)] if str(t) in acc else acc[t]:.1%}" for t in r["noise"]["timesteps"]) + " |")
    if r["ablations"]:
        lines += ["", f"Ablations (PPAP, {cfg['ablation_iterations']} steps per expert; noisy accuracy = mean over t=100/300/500/700 on "
                  f"{cfg['noise_images']} test images; guided = {10 * cfg['ablation_per_class']} samples at the PPAP-5 scale):", "",
                  "| factor | variant | ranges | trainable / expert | noisy acc. | guided acc. | guided FID | train time (s) |", "|---|---|---|---|---|---|---|---|"]
        for name, a in r["ablations"].items():
            lines.append(f"| {a['factor']} | {name} | {a['boundaries']} | {a['trainable_per_expert']:,} | {a['noisy_accuracy_mean']:.1%} | "
                         f"{a['guided_accuracy']:.1%} | {a['guided_fid']:.1f} | {a['train_seconds']:.0f} |")
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items())]
    return "\n".join(lines) + "\n"


def _memory(c: dict) -> str:
    """'step / peak': memory of the guided steps above the RSS before them, and the process peak."""
    step = "n/a" if c.get("step_memory_mib") is None else f"{c['step_memory_mib']:.0f}"
    return f"{step} / {c['peak_rss_mib']:.0f}"


def _savefig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_sweep(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = iter(plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2])  # 20 distinct series
    for name, points in r["sweep"].items():
        for cal in sorted({json.dumps(p["calibration"], sort_keys=True) for p in points}):
            series = [p for p in points if json.dumps(p["calibration"], sort_keys=True) == cal]
            label = name if len(series) == len(points) else f"{name} {_short(series[0]['calibration'])}"
            ax.plot([p["fid"] for p in series], [p["accuracy"] for p in series], "o-", label=label, color=next(colors))
            for p in series:
                ax.annotate(f"{p['scale']:g}", (p["fid"], p["accuracy"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("FID (evaluator features, vs test set)")
    ax.set_ylabel("evaluator accuracy on the target class")
    ax.set_title(f"Guidance-scale sweep ({10 * r['config']['sweep_per_class']} samples per point; labels = scale)")
    ax.legend(fontsize=7)
    _savefig(fig, path)
    plt.close(fig)


def _short(cal: dict) -> str:
    default = dataclasses.asdict(Calibration())
    return "(" + ", ".join(f"{k.split('_')[0]}={v}" for k, v in cal.items() if v != default[k]) + ")"


def plot_noise(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = r["noise"]["timesteps"]

    def series(acc):
        return [acc[str(t)] if str(t) in acc else acc[t] for t in ts]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, acc in r["noise"]["routed"].items():
        axes[0].plot(ts, series(acc), "o-", label=name)
    axes[0].set_title("routed models on noised real test images")
    for e in r["noise"]["per_expert"]["ppap-5"]:
        line, = axes[1].plot(ts, series(e["accuracy"]), "-", label=f"expert [{e['range'][0]},{e['range'][1]})")
        axes[1].axvspan(e["range"][0], e["range"][1], alpha=0.06, color=line.get_color())
    axes[1].set_title("each PPAP-5 expert, inside and outside its range")
    for ax in axes:
        ax.set_xlabel("timestep t")
        ax.set_ylabel("accuracy")
        ax.axhline(0.1, color="gray", lw=0.5, ls="--")
        ax.legend(fontsize=7)
    _savefig(fig, path)
    plt.close(fig)


def run_classifier_bench(out: Path, quick: bool = False, cfg: BenchConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or (QUICK if quick else BenchConfig())
    return ClassifierBench(cfg, out, progress=progress).run()
