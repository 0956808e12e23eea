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
Then ``results.json``, ``report.md`` and the two plots.
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..bank_format import BANK_MANIFEST, load_manifest, parameter_report
from ..banks import ExpertBank, load_bank, make_bank
from ..batch_sampling import generate_corpus
from ..corpus import corpus_spec, load_corpus, open_corpus, reuse_shards
from ..fashion_mnist import load_fashion_mnist
from ..guidance import Calibration, GuidanceTerm
from ..images import to_hwc_uint8
from ..io import PPAPError, atomic_write_bytes, atomic_write_json, read_json
from ..loading import load_guide
from ..metrics import accuracy_under_noise, features, fid, kid, precision_recall
from ..router import TimestepRouter
from ..tasks import task_for
from ..train import TrainConfig, train_experts
from .common import Bench, _savefig, exit_with_parent, guided_step_memory, in_order, machine, machine_in_order, pyplot, time_steps


@dataclass(frozen=True)
class Row:
    name: str  # the table's row label
    method: str  # guidance.METHODS key
    bank: str | None = None  # key into BenchConfig.banks
    calibration: Calibration = field(default_factory=Calibration)
    # a row ``make bench`` leaves out unless asked (``BenchConfig.extra_rows``): it carries no
    # claim the default rows do not (its figures are in docs/findings.md), and its cost is what
    # keeps ``make bench`` within 90 min on 2 CPU cores
    extra: bool = False


@dataclass(frozen=True)
class BankSpec:
    train: TrainConfig
    # "corpus" (data-free), "labelled" (real training images with labels) or "real" (real training
    # images without labels, distilled like the corpus: a diagnosis of what the corpus costs)
    data: str
    corpus_size: int | None = None  # use the first n images (ablation)
    # "corpus" data: a corpus this many times the bench's own, drawn alike (its first samples are
    # the bench's corpus, so only the new ones are drawn): what more generated images buy
    corpus_multiple: int = 1


CALIBRATED = Calibration(norm_temperature=2.0, softplus_beta=3.0, scale_schedule="sigma")
# the calibrated row is swept over these as well as over the scale (its best pair is used)
CALIBRATION_GRID = (
    Calibration(softplus_beta=3.0),
    Calibration(norm_temperature=2.0, softplus_beta=3.0),
    CALIBRATED,
)


# the paper's plain PPAP recipe (the official code's teacher sharpened to tau 0.25), pinned against
# TrainConfig's defaults (``ppap train``'s recipe, the "ppap-5 (default recipe)" row), so that
# changing those never changes these banks
PLAIN = dict(adapter="lora", rank=8, alpha=8, lr=1e-3, batch_size=64, warm_start=False, balance_classes=False, tau=0.25)
# the baselines' full copies (noise-aware, multi-expert-supervised) and the diagnosis rows in their form
FULL_COPY = dict(PLAIN, adapter="full", lr=5e-4)


def _banks(its: int) -> dict[str, BankSpec]:
    lora = PLAIN
    full = dict(FULL_COPY, objective="supervised", tau=None)  # labels: no teacher
    return {
        # ADM practice: one classifier over all t; same total optimiser steps as the 5 experts
        "noise-aware": BankSpec(TrainConfig(experts="1", iterations=5 * its, **full), "labelled"),
        "mes5": BankSpec(TrainConfig(experts="5", iterations=its, **full), "labelled"),
        "ppap1": BankSpec(TrainConfig(experts="1", iterations=its, **lora), "corpus"),
        "ppap5": BankSpec(TrainConfig(experts="5", iterations=its, **lora), "corpus"),
        "ppap10": BankSpec(TrainConfig(experts="10", iterations=its, **lora), "corpus"),
        "ppap5-recipe": BankSpec(TrainConfig(experts="5", iterations=its), "corpus"),
        # PPAP's data-free distillation in the noise-aware model's form (one full copy over every t,
        # its steps) toward the teacher's own softmax (tau 1): the FID-first choice
        "ppap1-full-tau1": BankSpec(TrainConfig(experts="1", iterations=5 * its, **dict(FULL_COPY, tau=1.0)), "corpus"),
    }


ROWS = (
    Row("unguided", "unguided"),
    Row("naive", "naive"),
    Row("noise-aware", "noise-aware", "noise-aware"),
    Row("multi-expert-supervised-5", "multi-expert-supervised", "mes5"),
    Row("ppap-1", "ppap", "ppap1"),
    Row("ppap-5", "ppap", "ppap5"),
    Row("ppap-10", "ppap", "ppap10", extra=True),
    Row("ppap-5 (default recipe)", "ppap", "ppap5-recipe"),
    Row("ppap-1 (full copy, tau 1)", "ppap", "ppap1-full-tau1"),
    Row("x0", "x0"),
    Row("x0-shortcut", "x0-shortcut", extra=True),
    Row("x0-shortcut-calibrated", "x0-shortcut", calibration=CALIBRATED, extra=True),
)


STAGES = ("banks", "cost", "sweep", "main", "noise", "ablations")  # in the order they run
# the noise-vs-accuracy models: the off-the-shelf net (no bank) and the routed banks
NOISE_MODELS = {
    "off-the-shelf": None,
    "noise-aware": "noise-aware",
    "multi-expert-supervised-5": "mes5",
    "ppap-5": "ppap5",
    "ppap-10": "ppap10",
    "ppap-5 (default recipe)": "ppap5-recipe",
    "ppap-1 (full copy, tau 1)": "ppap1-full-tau1",
}


@dataclass(frozen=True)
class Ablation:
    """One change to PPAP-5: a bank of its own (a training lever), the main table's PPAP-5 bank
    guiding differently (an inference lever, or the diagnosis: the noise-aware model guiding one
    expert's range), or the main table's default-recipe bank."""

    factor: str
    bank: BankSpec | str = "ppap5"  # a bank of its own, or the key of a main-table bank
    blend: int = 0  # soft routing width (``ExpertBank.blend``)
    interval: tuple[int, int] | None = None  # guide only for lo <= t < hi
    frozen_below: int = 0  # the off-the-shelf model guides t < this, the experts the rest
    normalize: bool = False  # unit-RMS gradients (its scale is swept on its own)
    noise_aware_range: int | None = None  # the noise-aware model guides expert i's range instead


NORMALIZED_SCALES = (0.03, 0.1, 0.3, 1.0)  # the normalised row's own sweep (unit-RMS gradients)


def _ablations(its: int) -> dict[str, Ablation]:
    """name -> ablation, at ``its`` steps per expert (the main table's budget)."""
    base = TrainConfig(experts="5", iterations=its, **PLAIN)
    r = dataclasses.replace
    levers = {
        "PPAP-5 (base)": Ablation("base"),
        "default recipe (the winners together)": Ablation("recipe", "ppap5-recipe"),
        "warm start": Ablation("training", BankSpec(r(base, warm_start=True), "corpus")),
        "rank 16": Ablation("training", BankSpec(r(base, rank=16, alpha=16), "corpus")),
        "rank 32": Ablation("training", BankSpec(r(base, rank=32, alpha=32), "corpus")),
        "class-balanced corpus": Ablation("training", BankSpec(r(base, balance_classes=True), "corpus")),
        "frozen model for t < 40": Ablation("guidance", frozen_below=40),
        "soft routing (100 steps)": Ablation("guidance", blend=100),
        "no guidance at t >= 800": Ablation("guidance", interval=(0, 800)),
        "gradient normalisation": Ablation("guidance", normalize=True),
        # the default recipe toward the official code's x4 sharpened teacher instead of its own softmax
        "sharpened teacher (tau 0.25)": Ablation("training", BankSpec(TrainConfig(experts="5", iterations=its, tau=0.25), "corpus")),
    }
    diagnosis = {f"noise-aware in expert {i}'s range": Ablation("diagnosis", noise_aware_range=i) for i in range(5)}
    # the default recipe distilled from real images instead of the DDPM's (still no label): what
    # learning from generated images costs
    diagnosis["default recipe on real images (no labels)"] = Ablation(
        "diagnosis", BankSpec(TrainConfig(experts="5", iterations=its), "real")
    )
    # ... and from all 60,000 (the noise-aware model's images): what the corpus's size costs
    diagnosis["default recipe on 60000 real images (no labels)"] = Ablation(
        "diagnosis", BankSpec(TrainConfig(experts="5", iterations=its), "real", corpus_size=60000)
    )
    # ... and from 3x as many generated images (the first third is the corpus): still data-free
    diagnosis["default recipe on a 3x corpus (no labels)"] = Ablation(
        "diagnosis", BankSpec(TrainConfig(experts="5", iterations=its), "corpus", corpus_multiple=3)
    )
    # the noise-aware model's own form (one full copy over every t, 5x the steps) trained data-free
    # like the experts: what the multi-expert LoRA form costs or gains at the same data and steps
    full = FULL_COPY
    diagnosis["one full model distilled (no labels)"] = Ablation(
        "diagnosis", BankSpec(TrainConfig(experts="1", iterations=5 * its, **full), "corpus")
    )
    # ... on 3x as many generated images: what more of them buy the full copy
    diagnosis["one full model distilled on a 3x corpus (no labels)"] = Ablation(
        "diagnosis", BankSpec(TrainConfig(experts="1", iterations=5 * its, **full), "corpus", corpus_multiple=3)
    )
    # ... toward the teacher's own softmax (tau 1): whether the sharpened target costs diversity
    diagnosis["one full model distilled at tau 1 (no labels)"] = Ablation("diagnosis", "ppap1-full-tau1")  # a main-table row's bank
    # ... on as many real images as the corpus holds: the images' source apart from their count
    diagnosis["one full model distilled on real images (no labels)"] = Ablation(
        "diagnosis", BankSpec(TrainConfig(experts="1", iterations=5 * its, **full), "real")
    )
    # ... and on the noise-aware model's own 60,000 images: only the targets differ (teacher, not labels)
    diagnosis["one full model distilled on 60000 real images (no labels)"] = Ablation(
        "diagnosis", BankSpec(TrainConfig(experts="1", iterations=5 * its, **full), "real", corpus_size=60000)
    )
    return levers | diagnosis


def ablation_names(which: tuple[str, ...] | str) -> list[str]:
    """The ablations ``which`` names ("all", or a tuple of names), in the table's order."""
    table = _ablations(1)
    if which == "all":
        return list(table)
    unknown = [n for n in which if n not in table]
    if unknown:
        raise PPAPError(f"unknown ablation {unknown[0]!r}; choose from: {', '.join(table)}")
    return [n for n in table if n in which]


def table_rows(extra: tuple[str, ...] | str) -> tuple[Row, ...]:
    """The main table's rows: the default ones and the extra rows ``extra`` names ("all", or a
    tuple of names), in the table's order."""
    extras = [row.name for row in ROWS if row.extra]
    unknown = [n for n in extra if n not in extras] if extra != "all" else []
    if unknown:
        raise PPAPError(f"unknown extra row {unknown[0]!r}; choose from: {', '.join(extras)}")
    return tuple(row for row in ROWS if not row.extra or extra == "all" or row.name in extra)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _ablation_stages(names: list[str], scale: float, noise_aware_scale: float) -> dict[str, str]:
    """name -> the stage file of its row at these scales."""
    return {n: f"ablation-{_slug(n)}-s{scale:g}-na{noise_aware_scale:g}" for n in names}


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
    sweep_scales: dict = field(
        default_factory=lambda: {
            "naive": (3.0, 10.0, 30.0, 100.0),
            "noise-aware": (3.0, 10.0, 30.0, 100.0),
            "multi-expert-supervised": (3.0, 10.0, 30.0, 100.0),
            "ppap": (3.0, 10.0, 30.0, 100.0),
            "x0": (1.0, 3.0, 10.0, 30.0),
            "x0-shortcut": (1.0, 3.0, 10.0, 30.0),
        }
    )
    noise_images: int = 2000  # real test images for the noise-vs-accuracy analysis
    noise_timesteps: tuple[int, ...] = (0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)
    ablation_per_class: int = 30  # guided samples per class for each ablation
    # at most this many real images for the unlabelled "real" diagnosis banks (None: as each asks,
    # up to all 60,000); the teacher labels every image once, which dominates a quick bench
    real_images_limit: int | None = None
    cost_batch: int = 64
    cost_repeats: int = 10
    cost_in_fresh_process: bool = True  # per-method peak memory needs a process of its own
    batch_size: int = 100  # sampling batch
    seed: int = 3000  # main table noises
    sweep_seed: int = 2000  # sweep noises (disjoint from the main table's)
    # the ablation rows to run: "all" (issue #13's levers and diagnosis: 4 more banks, 15 rows) or
    # a tuple of names. None by default: the main table already holds PPAP-5 against the default
    # recipe, and the levers would take ``make bench`` past 90 min on 2 CPU cores. Every row is a
    # stage of its own, so any choice reads back the rows it shares with an earlier one.
    ablations: tuple[str, ...] | str = ()
    # the main table's extra rows to run as well (``Row.extra``: PPAP-10, the x0 shortcuts): "all"
    # or a tuple of names. Like the ablations, a choice of rows, not a configuration: a folder
    # keeps every row it computed and adds those asked for later.
    extra_rows: tuple[str, ...] | str = ()
    # independent jobs (corpus shards, banks, sweep / main rows, ablations) run in this many
    # processes, the cores split between them. On 2 CPU cores two single-threaded workers trained
    # the banks 1.7x faster than one two-threaded process and sampled 1.0-1.14x (docs/reproducing.md);
    # 1 = everything in this process (e.g. on a GPU).
    workers: int = 2


QUICK = BenchConfig(
    corpus_size=32,
    corpus_dir="",
    corpus_steps=2,
    expert_iterations=4,
    steps=3,
    per_class=2,
    sweep_per_class=1,
    sweep_scales={
        "naive": (10.0, 30.0),
        "noise-aware": (10.0, 30.0),
        "multi-expert-supervised": (10.0, 30.0),
        "ppap": (10.0, 30.0),
        "x0": (3.0, 10.0),
        "x0-shortcut": (3.0, 10.0),
    },
    noise_images=100,
    noise_timesteps=(0, 500, 999),
    ablation_per_class=1,
    real_images_limit=320,
    ablations="all",
    extra_rows="all",
    cost_batch=4,
    cost_repeats=3,  # a median: one transient spike on a busy machine must not reorder the methods
    cost_in_fresh_process=False,
    batch_size=20,
    workers=1,  # at these sizes two spawned workers cost more to start (import, test-set features) than they save
)


def _finished(directory: Path, train: TrainConfig) -> bool:
    """Whether ``directory`` holds a finished bank trained with ``train``."""
    if not (directory / BANK_MANIFEST).exists():
        return False
    m = load_manifest(directory)
    same = m.get("train") == json.loads(json.dumps(dataclasses.asdict(train)))  # == so that alpha 8 is 8.0
    return same and len(m["trained"]) == len(m["boundaries"]) - 1


def _bank_seconds(directory: Path) -> float:
    m = load_manifest(directory)
    return round(sum(s["seconds"] for s in m["stats"].values()), 1)


def _choose(points: list[dict]) -> dict:
    """Highest evaluator accuracy; among points within 2 points of it, the lowest FID."""
    best = max(p["accuracy"] for p in points)
    return min((p for p in points if p["accuracy"] >= best - 0.02), key=lambda p: p["fid"])


def _training_steps(train: TrainConfig) -> int:
    """Optimiser steps of a bank in all (``experts`` is "N", "logsnr:N" or explicit boundaries)."""
    spec = train.experts.split(":")[-1]
    return train.iterations * (int(spec) if spec.isdigit() else len(spec.split(",")))


def _row_cost(row: Row) -> float:
    """Relative sampling cost, to start the longest jobs first (x0 back-propagates through the UNet)."""
    return 3.0 if row.method == "x0" else 0.5 if row.method == "unguided" else 1.0


class ClassifierBench(Bench):
    def __init__(self, cfg: BenchConfig, out: Path, progress: bool = True):
        super().__init__(cfg, out, progress)
        self.naive = load_guide(cfg.guide)  # clean: naive / x0 guidance; banks get copies of their own
        self.task = task_for(self.naive, self.pipe.image_shape, "classification")
        self._banks: dict[str, ExpertBank] = {}
        self._corpus: torch.Tensor | None = None
        self.rows = table_rows(cfg.extra_rows)
        used = {row.bank for row in self.rows}
        self.bank_keys = [k for k in _banks(1) if k in used]  # the banks the table's rows guide with
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
        guide = load_guide(self.cfg.guide)  # a fresh net per bank: LoRA is injected into it
        if _finished(self.bank_dir(key), spec.train):  # read-only: two workers may load it at once
            return load_bank(guide, self.bank_dir(key), schedule=self.diffusion.schedule).eval()
        task = task_for(guide, self.pipe.image_shape, "classification", tau=spec.train.tau)
        sched = self.diffusion.schedule
        router = TimestepRouter.parse(spec.train.experts, sched.num_train_timesteps, sched.alphas_cumprod)
        bank = make_bank(guide, router, spec.train.adapter_config(), seed=spec.train.seed)
        labels = None
        if spec.data == "labelled":
            images, labels = load_fashion_mnist("train")
        elif spec.data == "real":  # as many real images as the corpus holds, their labels unused
            n = spec.corpus_size or self.cfg.corpus_size
            images = load_fashion_mnist("train")[0][: min(n, self.cfg.real_images_limit or n)]
        else:
            images = self.corpus(spec.corpus_multiple * self.cfg.corpus_size)[: spec.corpus_size]
        train_experts(
            bank, task, sched, images, spec.train, self.bank_dir(key), labels=labels, identity=guide.identity, progress=self.progress
        )
        bank.task = task  # as load_bank sets it: the guidance term reads the task off the bank
        return bank.eval()

    def bank(self, key: str) -> ExpertBank:
        if key not in self._banks:
            self._banks[key] = self.train_bank(key, _banks(self.cfg.expert_iterations)[key])
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
        pred = self.evaluator_classes(x)
        feats = features(self.evaluator, x)
        per_class_acc = (pred == targets).float().view(self.task.num_classes, -1).mean(1)
        out = {
            "scale": scale,
            "n": len(x),
            "accuracy": (pred == targets).float().mean().item(),
            "per_class_accuracy": per_class_acc.tolist(),
            "per_class_min": per_class_acc.min().item(),
            "fid": fid(feats, self.real_features),
            "seconds": round(seconds, 1),
        }
        if save is not None:
            prec, rec = precision_recall(self.real_features[: len(x)], feats)
            out |= {"kid": kid(feats, self.real_features), "precision": prec, "recall": rec}
            buf = io.BytesIO()
            np.savez_compressed(buf, images=to_hwc_uint8(x), targets=targets.numpy())
            atomic_write_bytes(save, buf.getvalue())
        return out

    # ---- stages ------------------------------------------------------------------------------

    def bank_info(self, key: str) -> dict:
        """Train (or load) one bank of the main table and describe it."""
        spec = _banks(self.cfg.expert_iterations)[key]
        rep = parameter_report(self.bank(key))
        return {
            "train": dataclasses.asdict(spec.train),
            "data": spec.data,
            "train_seconds": _bank_seconds(self.bank_dir(key)),
            "trainable_parameters": int(rep["trainable_per_expert"] * rep["num_experts"]),
            "backbone_parameters": int(rep["backbone_parameters"]),
            "labelled_images": 60000 if spec.data == "labelled" else 0,
            "generated_images": spec.corpus_multiple * self.cfg.corpus_size if spec.data == "corpus" else 0,
        }

    def banks_stage(self) -> dict:
        self.corpus_stage()
        # longest first, so that two workers finish together
        keys = sorted(self.bank_keys, key=lambda k: -_training_steps(_banks(1)[k].train))
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
            if self.cfg.cost_in_fresh_process:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent) as pool:
                    memory = pool.submit(guided_step_memory, *args).result()
            else:
                memory = guided_step_memory(*args)
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
                point = _choose(sweep[row.name])
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
        bank.blend = a.blend
        term = self.term(Row(name, "ppap", None), scale, targets, experts=bank)
        assert term is not None
        term = dataclasses.replace(term, interval=a.interval, normalize=a.normalize)
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
            scale = _choose(points)["scale"]
        guided = self.ablation_row(name, scale, noise_aware_scale, self.cfg.ablation_per_class, self.cfg.sweep_seed + 1)
        bank.blend = 0
        if isinstance(a.bank, BankSpec):
            self._banks.pop(key)
        spec = a.bank if isinstance(a.bank, BankSpec) else _banks(self.cfg.expert_iterations)[a.bank]
        return {
            "factor": a.factor,
            "data": spec.data,
            "train": load_manifest(self.bank_dir(key))["train"],
            "boundaries": list(bank.router.boundaries),
            "trainable_per_expert": int(parameter_report(bank)["trainable_per_expert"]),
            "train_seconds": _bank_seconds(self.bank_dir(key)),
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
        def jobs_stage(name: str, compute, files: list[str]):
            done = [self.stage.exists(f) for f in files]
            return timed(name, compute, cached=all(done), save=False, partly=any(done))

        rows = [row.name for row in self.rows]
        banks = jobs_stage("banks", self.banks_stage, [f"bank-{k}" for k in self.bank_keys])
        self._drop_if_lacking("cost", rows)
        cost = timed("cost", self.cost_stage)
        sweep = jobs_stage("sweep", self.sweep_stage, [f"sweep-{n}" for n in rows[1:]])
        main = jobs_stage("main", lambda: self.main_stage(sweep), [f"main-{n}" for n in rows])
        self._drop_if_lacking("noise", list(self.noise_models), part="routed")
        noise = timed("noise", self.noise_stage)
        names, scales = ablation_names(cfg.ablations), (main["ppap-5"]["scale"], main["noise-aware"]["scale"])
        ablations = {}
        if names:  # each row is its own stage file, so that another choice of rows reads back those it shares
            cached = all(self.stage.exists(f) for f in _ablation_stages(names, *scales).values())
            ablations = timed("ablations", lambda: self.ablation_stage(*scales, names), cached=cached, save=False)
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
        atomic_write_json(self.out / "results.json", results)
        atomic_write_bytes(self.out / "report.md", classifier_report(results).encode())
        plot_sweep(results, self.out / "bench_sweep.png")
        plot_noise(results, self.out / "bench_noise_accuracy.png")
        return results


# --------------------------------------------------------------------------------------------
# report and plots
# --------------------------------------------------------------------------------------------


def _in_order(r: dict) -> dict:
    """``r`` with its tables in the bench's order (rows, noise models, ablations, stages): stages
    read back from their files (and results.json) hold them sorted by name, and a resumed report
    or figure must read as the first one did."""
    rows = [row.name for row in ROWS]
    return r | {
        "main": in_order(r["main"], rows),
        "sweep": in_order(r["sweep"], rows),
        "ablations": in_order(r["ablations"], _ablations(1)),
        "stage_seconds": in_order(r["stage_seconds"], STAGES),
        "noise": r["noise"] | {"routed": in_order(r["noise"]["routed"], NOISE_MODELS)},
    }


def classifier_report(r: dict) -> str:
    r = _in_order(r)
    cfg, main, banks, cost = r["config"], r["main"], r["banks"], r["cost"]
    bank_of = {row.name: row.bank for row in ROWS}
    lines = [
        f"Machine: {machine_in_order(r)}. DDIM-{cfg['steps']}, {10 * cfg['per_class']} samples per row (balanced over the 10 classes), "
        f"same initial noises for every row; scale chosen per method on a separate seed set.",
        "",
        "| method | scale | accuracy | FID | KID | precision | recall | trainable params | labelled images | train time (s) | step cost (x unguided) | memory: step / peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in main.items():
        b = banks.get(bank_of.get(name) or "", {})
        lines.append(
            f"| {name} | {m['scale']:g} | {m['accuracy']:.1%} | {m['fid']:.2f} | {m['kid']:.3f} | {m['precision']:.2f} | "
            f"{m['recall']:.2f} | {b.get('trainable_parameters', 0):,} | {b.get('labelled_images', 0):,} | "
            f"{b.get('train_seconds', 0):.0f} | {cost[name]['ratio_to_unguided']:.2f} | {_memory(cost[name])} |"
        )
    real = r["real_reference"]
    lines.append(
        f"| *real training images* | | {real['accuracy']:.1%} | {real['fid']:.2f} | {real['kid']:.3f} | {real['precision']:.2f} | {real['recall']:.2f} | | | | | |"
    )
    cal = main.get("x0-shortcut-calibrated", {}).get("calibration")
    if cal:
        lines.append(f"\nx0-shortcut-calibrated uses {_short(cal)} (best of {len(CALIBRATION_GRID)} calibrations x scales in the sweep).")
    p5, mes, nv = main["ppap-5"]["accuracy"], main["multi-expert-supervised-5"]["accuracy"], main["naive"]["accuracy"]
    lines += [
        "",
        f"PPAP-5 accuracy / multi-expert-supervised-5: {p5 / max(mes, 1e-9):.2f}; PPAP-5 / naive: {p5 / max(nv, 1e-9):.2f}; "
        f"trainable parameters PPAP-5 / multi-expert-supervised-5: "
        f"{banks['ppap5']['trainable_parameters'] / banks['mes5']['trainable_parameters']:.3f}.",
        "",
    ]
    # issue #13's criterion: data-free accuracy >= 0.97x and FID <= 1.3x the labelled model's
    aware = main["noise-aware"]
    for name in ("ppap-5 (default recipe)", "ppap-1 (full copy, tau 1)"):
        if name in main:
            m = main[name]
            lines += [
                f"{name} / noise-aware: accuracy {m['accuracy'] / max(aware['accuracy'], 1e-9):.3f}, "
                f"FID {m['fid'] / max(aware['fid'], 1e-9):.2f}.",
                "",
            ]
    lines += [
        "Noise vs accuracy (real test images noised to t):",
        "",
        "| model | " + " | ".join(f"t={t}" for t in r["noise"]["timesteps"]) + " |",
        "|---" * (len(r["noise"]["timesteps"]) + 1) + "|",
    ]
    for name, acc in r["noise"]["routed"].items():
        lines.append(f"| {name} | " + " | ".join(f"{acc[str(t)] if str(t) in acc else acc[t]:.1%}" for t in r["noise"]["timesteps"]) + " |")
    if r["ablations"]:
        lines += [
            "",
            f"Ablations (PPAP-5, {cfg['expert_iterations']} steps per expert; noisy accuracy = mean over t=100/300/500/700 on "
            f"{cfg['noise_images']} test images, for banks of their own; guided = {10 * cfg['ablation_per_class']} samples "
            f"(seed {cfg['sweep_seed'] + 1}) at the PPAP-5 scale, the normalised row at its own, the diagnosis rows' noise-aware "
            "model at the noise-aware row's (PPAP / noise-aware):",
            "",
            "| factor | variant | scale | noisy acc. | guided acc. | worst class | guided FID | trainable / expert | train time (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, a in r["ablations"].items():
            g, noisy = a["guided"], a["noisy_accuracy_mean"]
            scale = f"{g['scale']:g}" + (f" / {a['noise_aware_scale']:g}" if a.get("noise_aware_scale") is not None else "")
            lines.append(
                f"| {a['factor']} | {name} | {scale} | {'-' if noisy is None else f'{noisy:.1%}'} | {g['accuracy']:.1%} | "
                f"{g['per_class_min']:.0%} | {g['fid']:.1f} | {a['trainable_per_expert']:,} | {a['train_seconds']:.0f} |"
            )
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items())]
    return "\n".join(lines) + "\n"


def _memory(c: dict) -> str:
    """'step / peak': memory of the guided steps above the RSS before them, and the process peak."""
    step = "n/a" if c.get("step_memory_mib") is None else f"{c['step_memory_mib']:.0f}"
    return f"{step} / {c['peak_rss_mib']:.0f}"


def _short(cal: dict) -> str:
    default = dataclasses.asdict(Calibration())
    return "(" + ", ".join(f"{k.split('_')[0]}={v}" for k, v in cal.items() if v != default[k]) + ")"


def plot_sweep(r: dict, path: Path) -> None:
    r, plt = _in_order(r), pyplot()
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


def plot_noise(r: dict, path: Path) -> None:
    r, plt = _in_order(r), pyplot()
    ts = r["noise"]["timesteps"]

    def series(acc):
        return [acc[str(t)] if str(t) in acc else acc[t] for t in ts]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, acc in r["noise"]["routed"].items():
        axes[0].plot(ts, series(acc), "o-", label=name)
    axes[0].set_title("routed models on noised real test images")
    for e in r["noise"]["per_expert"]["ppap-5"]:
        (line,) = axes[1].plot(ts, series(e["accuracy"]), "-", label=f"expert [{e['range'][0]},{e['range'][1]})")
        axes[1].axvspan(e["range"][0], e["range"][1], alpha=0.06, color=line.get_color())
    axes[1].set_title("each PPAP-5 expert, inside and outside its range")
    for ax in axes:
        ax.set_xlabel("timestep t")
        ax.set_ylabel("accuracy")
        ax.axhline(0.1, color="gray", lw=0.5, ls="--")
        ax.legend(fontsize=7)
    _savefig(fig, path)


def run_classifier_bench(out: Path, quick: bool = False, cfg: BenchConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or (QUICK if quick else BenchConfig())
    return ClassifierBench(cfg, out, progress=progress).run()
