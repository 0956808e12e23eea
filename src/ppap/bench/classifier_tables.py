"""The classifier bench's tables: its rows (``Row``, ``ROWS``), the banks they guide with
(``BankSpec``, ``bank_specs``), the ablations of PPAP-5 (``Ablation``, ``_ablations``) and the
configuration (``BenchConfig``, ``QUICK``). What the bench compares, not how it runs it
(``bench.classifier``) or reports it (``bench.classifier_report``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..guidance import Calibration
from ..io import PPAPError
from ..train import TrainConfig


@dataclass(frozen=True)
class Row:
    name: str  # the table's row label
    method: str  # guidance.METHODS key
    bank: str | None = None  # key into ``bank_specs``
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


def bank_specs(its: int) -> dict[str, BankSpec]:
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
    blend: int = 0  # soft routing width of the PPAP-5 term (``GuidanceTerm.blend``)
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


def _training_steps(train: TrainConfig) -> int:
    """Optimiser steps of a bank in all (``experts`` is "N", "logsnr:N" or explicit boundaries)."""
    spec = train.experts.split(":")[-1]
    return train.iterations * (int(spec) if spec.isdigit() else len(spec.split(",")))


def _row_cost(row: Row) -> float:
    """Relative sampling cost, to start the longest jobs first (x0 back-propagates through the UNet)."""
    return 3.0 if row.method == "x0" else 0.5 if row.method == "unguided" else 1.0
