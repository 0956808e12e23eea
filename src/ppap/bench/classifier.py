"""``ppap bench classifier``: the paper's comparison on the zoo, side by side in one run.

Stages (each saved under ``out/`` and skipped when re-run, so a killed bench resumes):
  1. corpus   unlabelled DDIM samples of the DDPM (shared with the zoo recipes)
  2. banks    every trained guide, by the one training loop: noise-aware (1 full copy, labels),
              multi-expert-supervised-5 (5 full copies, labels), PPAP-1/5 and the default recipe
              (LoRA, data-free), PPAP-1 as one full copy toward a tau-1 teacher (data-free); PPAP-10
              only as an extra row (``--extra-rows``, like the x0 shortcuts)
  3. cost     one guided DDIM step per method vs an unguided one (timed round-robin), and the
              memory a guided step adds (each method in a fresh process)
  4. sweep    guidance scale per method on a separate seed set: accuracy and FID per scale
  5. main     every row on the same initial noises and balanced targets at its chosen scale:
              evaluator accuracy, FID / KID / precision / recall against the real test set
  6. noise    accuracy on noised real test images vs t (the paper's Sec. 3 analysis)
  7. ablate   the levers on PPAP-5 (training: warm start, rank, class-balanced corpus; guidance:
              frozen model at low t, soft routing, interval, normalisation) and the diagnosis
              (the noise-aware model guiding one expert's range); only with ``--ablations``
              (``BenchConfig.ablations``: "all" or some rows)
Then ``results.json``, ``report.md`` and the two plots. This module runs the stages; the rows,
banks, ablations and configuration are ``bench.classifier_tables``, the report and the plots
``bench.classifier_report``.
"""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import torch

from ..bank_format import load_manifest, parameter_report
from ..banks import ExpertBank
from ..batch_sampling import generate_corpus
from ..corpus import corpus_spec, load_corpus, open_corpus, reuse_shards
from ..fashion_mnist import load_fashion_mnist
from ..guidance import Calibration, GuidanceTerm
from ..images import to_hwc_uint8
from ..io import atomic_write_bytes, read_json
from ..loading import load_guide
from ..metrics import accuracy_under_noise, features, fid, kid, precision_recall
from ..tasks import task_for
from .classifier_report import _in_order, classifier_report, plot_noise, plot_sweep
from .classifier_tables import (
    CALIBRATION_GRID,
    NOISE_MODELS,
    NORMALIZED_SCALES,
    QUICK,
    BankSpec,
    BenchConfig,
    Row,
    _ablations,
    _row_cost,
    _training_steps,
    ablation_names,
    bank_specs,
    table_rows,
)
from .common import (
    Bench,
    bank_train_seconds,
    choose_scale,
    class_scores,
    guided_step_memory,
    in_fresh_process,
    machine,
    time_steps,
    train_or_load_bank,
)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _ablation_stages(names: list[str], scale: float, noise_aware_scale: float) -> dict[str, str]:
    """name -> the stage file of its row at these scales."""
    return {n: f"ablation-{_slug(n)}-s{scale:g}-na{noise_aware_scale:g}" for n in names}


class ClassifierBench(Bench):
    def __init__(self, cfg: BenchConfig, out: Path, progress: bool = True):
        super().__init__(cfg, out, progress)
        self.naive = load_guide(cfg.guide)  # clean: naive / x0 guidance; banks get copies of their own
        self.task = task_for(self.naive, self.pipe.image_shape, "classification")
        self._banks: dict[str, ExpertBank] = {}
        self._corpus: torch.Tensor | None = None
        self.rows = table_rows(cfg.extra_rows)
        used = {row.bank for row in self.rows}
        self.bank_keys = [k for k in bank_specs(1) if k in used]  # the banks the table's rows guide with
        self.noise_models = {name: key for name, key in NOISE_MODELS.items() if key is None or key in used}

    # ---- data ------------------------------------------------------------------------------

    def _larger(self, n: int | None) -> bool:
        """Whether ``n`` samples need a corpus of their own (more than the bench's holds)."""
        return n is not None and n > self.cfg.corpus_size

    def _corpus_root_and_spec(self, n: int | None = None):
        """The folder and identity of the corpus of ``n`` samples (default: the bench's own); a
        larger one lives beside it (``fashion-ddpm-12000`` next to ``fashion-ddpm-4000``)."""
        root = Path(self.cfg.corpus_dir) if self.cfg.corpus_dir else self.out / "corpus"
        if not self._larger(n):
            return root, corpus_spec(self.pipe, self.cfg.diffusion, self.cfg.corpus_size, steps=self.cfg.corpus_steps)
        assert n is not None
        root = root.parent / f"{self.cfg.diffusion}-{n}" if self.cfg.corpus_dir else self.out / f"corpus-{n}"
        return root, corpus_spec(self.pipe, self.cfg.diffusion, n, steps=self.cfg.corpus_steps)

    def corpus_shard(self, k: int, n: int | None = None) -> int:
        root, spec = self._corpus_root_and_spec(n)
        return generate_corpus(self.pipe, root, spec, shards=[k], progress=False)

    def corpus_stage(self, n: int | None = None) -> None:
        """Draw the shards the corpus of ``n`` samples still lacks, a job each (the shards are the
        cache); a larger corpus than the bench's own first copies the shards they share."""
        root, spec = self._corpus_root_and_spec(n)
        missing = open_corpus(root, spec)
        if missing and self._larger(n):
            self.corpus_stage()
            reuse_shards(root, spec, self._corpus_root_and_spec()[0])
            missing = open_corpus(root, spec)
        tag = f"-{n}" if self._larger(n) else ""
        self.jobs("corpus", {f"corpus{tag}-shard-{k}": ("corpus_shard", (k, n)) for k in missing}, cache=False)

    def corpus(self, n: int | None = None) -> torch.Tensor:
        """The first ``n`` samples of the bench's corpus, or a larger corpus of ``n``."""
        if self._larger(n):
            self.corpus_stage(n)
            return load_corpus(self._corpus_root_and_spec(n)[0])
        if self._corpus is None:
            self.corpus_stage()
            self._corpus = load_corpus(self._corpus_root_and_spec()[0])
        return self._corpus[:n]

    def bank_dir(self, key: str) -> Path:
        return self.out / "banks" / key

    def train_bank(self, key: str, spec: BankSpec) -> ExpertBank:
        """Train (or resume, or just load) a bank with the one training loop."""

        def data() -> tuple[torch.Tensor, torch.Tensor | None]:
            if spec.data == "labelled":
                return load_fashion_mnist("train")
            if spec.data == "real":  # as many real images as the corpus holds, their labels unused
                n = spec.corpus_size or self.cfg.corpus_size
                return load_fashion_mnist("train")[0][: min(n, self.cfg.real_images_limit or n)], None
            return self.corpus(spec.corpus_multiple * self.cfg.corpus_size)[: spec.corpus_size], None

        # a fresh net per bank: LoRA is injected into it
        return train_or_load_bank(load_guide(self.cfg.guide), self.diffusion, spec.train, self.bank_dir(key), data, self.progress)

    def bank(self, key: str) -> ExpertBank:
        if key not in self._banks:
            self._banks[key] = self.train_bank(key, bank_specs(self.cfg.expert_iterations)[key])
        return self._banks[key]

    # ---- sampling ----------------------------------------------------------------------------

    def term(self, row: Row, scale: float, targets: torch.Tensor, experts: ExpertBank | None = None) -> GuidanceTerm | None:
        """Row ``row``'s guidance toward ``targets`` at ``scale`` (None for the unguided row);
        ``experts`` replaces the row's bank."""
        return self.pipe.guidance_term(
            len(targets),
            guide=self.naive,
            experts=experts or (self.bank(row.bank) if row.bank else None),
            target=targets,
            method=row.method,
            classifier_scale=scale,
            calibration=row.calibration,
        )

    def run_row(
        self, row: Row, scale: float, per_class: int, seed: int, save: Path | None = None, terms: list[GuidanceTerm] | None = None
    ) -> dict:
        """``per_class`` samples of every class guided as ``row`` at ``scale`` (or by ``terms``),
        scored by the evaluator; ``save``: also KID / precision / recall and the samples."""
        targets = torch.arange(self.task.num_classes).repeat_interleave(per_class)
        guidance = terms if terms is not None else self.term(row, scale, targets)
        x, seconds = self.sample(len(targets), guidance, seed, desc=f"{row.name} s={scale:g}")
        out = {"scale": scale} | class_scores(self.evaluator, x, targets, self.task.num_classes, self.real_features, full=save is not None)
        out["seconds"] = round(seconds, 1)
        if save is not None:
            buf = io.BytesIO()
            np.savez_compressed(buf, images=to_hwc_uint8(x), targets=targets.numpy())
            atomic_write_bytes(save, buf.getvalue())
        return out

    # ---- stages ------------------------------------------------------------------------------

    def bank_info(self, key: str) -> dict:
        """Train (or load) one bank of the main table and describe it."""
        spec = bank_specs(self.cfg.expert_iterations)[key]
        rep = parameter_report(self.bank(key))
        return {
            "train": dataclasses.asdict(spec.train),
            "data": spec.data,
            "train_seconds": bank_train_seconds(self.bank_dir(key)),
            "trainable_parameters": int(rep["trainable_per_expert"] * rep["num_experts"]),
            "backbone_parameters": int(rep["backbone_parameters"]),
            "labelled_images": 60000 if spec.data == "labelled" else 0,
            "generated_images": spec.corpus_multiple * self.cfg.corpus_size if spec.data == "corpus" else 0,
        }

    def banks_stage(self) -> dict:
        self.corpus_stage()
        # longest first, so that two workers finish together
        keys = sorted(self.bank_keys, key=lambda k: -_training_steps(bank_specs(1)[k].train))
        done = self.jobs("banks", {f"bank-{k}": ("bank_info", (k,)) for k in keys})
        return {k: done[f"bank-{k}"] for k in self.bank_keys}

    def cost_stage(self) -> dict:
        """Seconds per guided step, all methods timed round-robin in this process (a transient load
        hits every method alike); the memory a step adds, each method in a fresh process."""
        targets = torch.arange(self.cfg.cost_batch) % self.task.num_classes
        guides = {}
        for row in self.rows:
            term = self.term(row, 1.0, targets)
            guides[row.name] = term.build(self.diffusion) if term is not None else None
        seconds = time_steps(self.diffusion, guides, self.cfg.cost_batch, self.cfg.steps, self.cfg.cost_repeats)
        rows = {}
        for row in self.rows:
            args = (
                self.cfg.diffusion,
                self.cfg.guide,
                str(self.bank_dir(row.bank)) if row.bank else None,
                row.method,
                row.calibration,
                self.cfg.cost_batch,
                self.cfg.steps,
            )
            memory = in_fresh_process(guided_step_memory, *args) if self.cfg.cost_in_fresh_process else guided_step_memory(*args)
            rows[row.name] = {
                "seconds_per_step": round(seconds[row.name], 4),
                "batch": self.cfg.cost_batch,
                "ratio_to_unguided": round(seconds[row.name] / seconds["unguided"], 2),
            } | memory
        return rows

    def sweep_row(self, row: Row) -> list[dict]:
        cals = CALIBRATION_GRID if row.calibration != Calibration() else (row.calibration,)
        return [
            self.run_row(dataclasses.replace(row, calibration=c), s, self.cfg.sweep_per_class, self.cfg.sweep_seed)
            | {"calibration": dataclasses.asdict(c)}
            for c in cals
            for s in self.cfg.sweep_scales[row.method]
        ]

    def sweep_stage(self) -> dict:
        guided = [row for row in self.rows if row.method != "unguided"]
        done = self.jobs("sweep", {f"sweep-{row.name}": ("sweep_row", (row,)) for row in sorted(guided, key=_row_cost, reverse=True)})
        return {row.name: done[f"sweep-{row.name}"] for row in guided}

    def main_row(self, row: Row, scale: float) -> dict:
        (self.out / "samples").mkdir(exist_ok=True)
        return self.run_row(row, scale, self.cfg.per_class, self.cfg.seed, save=self.out / "samples" / f"{row.name}.npz") | {
            "calibration": dataclasses.asdict(row.calibration)
        }

    def main_stage(self, sweep: dict) -> dict:
        jobs = {}
        for row in sorted(self.rows, key=_row_cost, reverse=True):
            scale, chosen = 0.0, row
            if row.method != "unguided":
                point = choose_scale(sweep[row.name])
                scale, chosen = point["scale"], dataclasses.replace(row, calibration=Calibration(**point["calibration"]))
            jobs[f"main-{row.name}"] = ("main_row", (chosen, scale))
        done = self.jobs("main", jobs)
        return {row.name: done[f"main-{row.name}"] for row in self.rows}

    def noise_stage(self) -> dict:
        x, y = self.x_test[: self.cfg.noise_images], self.y_test[: self.cfg.noise_images]
        ts = list(self.cfg.noise_timesteps)
        sched = self.diffusion.schedule
        off = self.naive
        out = {
            "timesteps": ts,
            "routed": {
                name: accuracy_under_noise((lambda xt, t: off(xt)) if key is None else self.bank(key), sched, x, y, ts)
                for name, key in self.noise_models.items()
            },
            "per_expert": {},
        }
        for name, key in (("ppap-5", "ppap5"), ("multi-expert-supervised-5", "mes5")):
            bank = self.bank(key)
            out["per_expert"][name] = [
                {
                    "range": list(bank.router.interval(i)),
                    "accuracy": accuracy_under_noise(lambda xt, t, i=i, bank=bank: bank.run_expert(i, xt), sched, x, y, ts),
                }
                for i in range(bank.router.num_experts)
            ]
        return out

    def ablation_bank_key(self, name: str) -> str:
        """The bank folder key of ablation ``name``: its own, or the main-table bank it uses."""
        spec = _ablations(self.cfg.expert_iterations)[name].bank
        return spec if isinstance(spec, str) else "ablation-" + _slug(name)

    def ablation_bank(self, name: str) -> tuple[str, ExpertBank]:
        key, spec = self.ablation_bank_key(name), _ablations(self.cfg.expert_iterations)[name].bank
        if isinstance(spec, str):
            return key, self.bank(key)
        if key not in self._banks:
            self._banks[key] = self.train_bank(key, spec)
        return key, self._banks[key]

    def ablation_terms(self, name: str, targets: torch.Tensor, scale: float, noise_aware_scale: float) -> list[GuidanceTerm]:
        """The guidance of ablation ``name``: PPAP-5 at ``scale`` with the ablation's change."""
        a = _ablations(self.cfg.expert_iterations)[name]
        _, bank = self.ablation_bank(name)
        term = self.term(Row(name, "ppap", None), scale, targets, experts=bank)
        assert term is not None
        term = dataclasses.replace(term, interval=a.interval, normalize=a.normalize, blend=a.blend)  # the bank itself stays as it is
        T = self.diffusion.schedule.num_train_timesteps
        if a.frozen_below:
            naive = self.term(Row("naive", "naive"), scale, targets)
            return [dataclasses.replace(naive, interval=(0, a.frozen_below)), dataclasses.replace(term, interval=(a.frozen_below, T))]
        if a.noise_aware_range is not None:
            lo, hi = bank.router.interval(a.noise_aware_range)
            aware = self.term(Row("noise-aware", "noise-aware", "noise-aware"), noise_aware_scale, targets)
            pieces = [dataclasses.replace(aware, interval=(lo, hi))]
            pieces += [dataclasses.replace(term, interval=iv) for iv in ((0, lo), (hi, T)) if iv[0] < iv[1]]
            return pieces
        return [term]

    def ablation_row(self, name: str, scale: float, noise_aware_scale: float, per_class: int, seed: int) -> dict:
        targets = torch.arange(self.task.num_classes).repeat_interleave(per_class)
        terms = self.ablation_terms(name, targets, scale, noise_aware_scale)
        return self.run_row(Row(name, "ppap"), scale, per_class, seed, terms=terms)

    def ablation(self, name: str, scale: float, noise_aware_scale: float) -> dict:
        a = _ablations(self.cfg.expert_iterations)[name]
        key, bank = self.ablation_bank(name)
        x, y = self.x_test[: self.cfg.noise_images], self.y_test[: self.cfg.noise_images]
        ts = [t for t in (100, 300, 500, 700) if t < self.diffusion.schedule.num_train_timesteps]
        noisy = accuracy_under_noise(bank, self.diffusion.schedule, x, y, ts) if a.bank != "ppap5" else None
        if a.normalize:  # unit-RMS gradients need a scale of their own: chosen like the main rows'
            points = [
                self.ablation_row(name, s, noise_aware_scale, self.cfg.sweep_per_class, self.cfg.sweep_seed) for s in NORMALIZED_SCALES
            ]
            scale = choose_scale(points)["scale"]
        guided = self.ablation_row(name, scale, noise_aware_scale, self.cfg.ablation_per_class, self.cfg.sweep_seed + 1)
        if isinstance(a.bank, BankSpec):
            self._banks.pop(key)
        spec = a.bank if isinstance(a.bank, BankSpec) else bank_specs(self.cfg.expert_iterations)[a.bank]
        return {
            "factor": a.factor,
            "data": spec.data,
            "train": load_manifest(self.bank_dir(key))["train"],
            "boundaries": list(bank.router.boundaries),
            "trainable_per_expert": int(parameter_report(bank)["trainable_per_expert"]),
            "train_seconds": bank_train_seconds(self.bank_dir(key)),
            "noisy_accuracy": noisy,
            "noisy_accuracy_mean": None if noisy is None else sum(noisy.values()) / len(noisy),
            "guided": guided,
            "noise_aware_scale": noise_aware_scale if a.noise_aware_range is not None else None,
        }

    def ablation_stage(self, scale: float, noise_aware_scale: float, names: list[str] | None = None) -> dict:
        """Every ablation (or ``names``) at PPAP-5's scale; the noise-aware model of the diagnosis
        rows at its own. A stage file per row and scales, so another scale is another row."""
        table = _ablations(self.cfg.expert_iterations)
        names = list(table) if names is None else names
        stage = _ablation_stages(names, scale, noise_aware_scale)
        order = sorted(names, key=lambda n: -(_training_steps(table[n].bank.train) if isinstance(table[n].bank, BankSpec) else 0))
        for multiple in sorted({b.corpus_multiple for n in names if isinstance(b := table[n].bank, BankSpec) and b.data == "corpus"}):
            self.corpus_stage(multiple * self.cfg.corpus_size)  # in the pool, before the banks that need it
        done = self.jobs("ablations", {stage[n]: ("ablation", (n, scale, noise_aware_scale)) for n in order})
        return {n: done[stage[n]] for n in names}

    def real_reference(self) -> dict:
        """The same metrics for real training images: the floor a generator can reach."""
        x, y = load_fashion_mnist("train")
        n = self.task.num_classes * self.cfg.per_class
        feats = features(self.evaluator, x[:n])
        acc = (self.evaluator_classes(x[:n]) == y[:n]).float().mean().item()
        prec, rec = precision_recall(self.real_features[:n], feats)
        return {
            "n": n,
            "accuracy": acc,
            "fid": fid(feats, self.real_features),
            "kid": kid(feats, self.real_features),
            "precision": prec,
            "recall": rec,
        }

    def _drop_if_lacking(self, name: str, keys: list[str], part: str | None = None) -> None:
        """Delete stage ``name``'s file if its value (or its ``part``) lacks one of ``keys``."""
        if self.stage.exists(name):
            value = read_json(self.stage.path(name), f"bench stage {name}")
            if any(k not in (value[part] if part else value) for k in keys):
                self.stage.path(name).unlink()

    def _run(self) -> dict:
        t0 = time.time()
        cfg, timed = self.cfg, self.timed

        # banks, sweep and main: every job is a stage file of its own, so that a row added to the
        # table computes only its own jobs; cost and noise are one computation over every row, so
        # a saved one that lacks a row is computed again
        rows = [row.name for row in self.rows]
        banks = self.timed_parts("banks", self.banks_stage, [f"bank-{k}" for k in self.bank_keys])
        self._drop_if_lacking("cost", rows)
        cost = timed("cost", self.cost_stage)
        sweep = self.timed_parts("sweep", self.sweep_stage, [f"sweep-{n}" for n in rows[1:]])
        main = self.timed_parts("main", lambda: self.main_stage(sweep), [f"main-{n}" for n in rows])
        self._drop_if_lacking("noise", list(self.noise_models), part="routed")
        noise = timed("noise", self.noise_stage)
        names, scales = ablation_names(cfg.ablations), (main["ppap-5"]["scale"], main["noise-aware"]["scale"])
        ablations = {}
        if names:  # each row is its own stage file, so that another choice of rows reads back those it shares
            ablations = self.timed_parts(
                "ablations", lambda: self.ablation_stage(*scales, names), list(_ablation_stages(names, *scales).values())
            )
        results = _in_order(
            {
                "config": dataclasses.asdict(cfg),
                "machine": machine(),
                "banks": banks,
                "cost": cost,
                "sweep": sweep,
                "main": main,
                "noise": noise,
                "ablations": ablations,
                "stage_seconds": self.timings,
                "seconds_this_call": round(time.time() - t0, 1),
                "real_reference": self.stage.get("real", self.real_reference),
            }
        )
        self.save_results(results, classifier_report(results))
        plot_sweep(results, self.out / "bench_sweep.png")
        plot_noise(results, self.out / "bench_noise_accuracy.png")
        return results


def run_classifier_bench(out: Path, quick: bool = False, cfg: BenchConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or (QUICK if quick else BenchConfig())
    return ClassifierBench(cfg, out, progress=progress).run()
