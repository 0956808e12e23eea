"""``ppap bench rgb``: the paper's GLIDE setting in miniature. The text-conditional colour model
(``fashion-rgb-ddpm``: a prompt per sample, classifier-free guidance) steered by off-the-shelf
models in transformers' format, every row on the same initial noises and the same sampler
(``sampler``: the pipeline's own DDPM ancestral steps by default).

Classification, over (colour, garment) pairs (all 80 by default): prompt "a {colour} garment",
target the garment. Rows: unguided (CFG only), naive (``fashion-rgb-classifier`` on x_t), ppap-5
(``fashion-rgb-ppap5``), x0 (the classifier on the x0 prediction) and noise-aware (a full copy of
the classifier fine-tuned with labels on noised colour images, trained here exactly as the
classifier bench trains its noise-aware bank). Per row: the evaluator's accuracy and worst class,
colour fidelity (``ppap.fashion_rgb.colour_fidelity``), FID / precision / recall in the
evaluator's features against real colour test images, seconds per sampling step.

Segmentation: ``fashion-rgb-segmenter``'s label maps of real colour test images as targets, the
prompt's colour cycled over the 8 colours. Rows: unguided, naive, x0, ppap-5
(``fashion-rgb-segmenter-ppap5``). Per row: foreground IoU to the target
(``bench.dense.segmentation_scores`` on ``fashion_rgb.garment_mask``), colour fidelity, FID.
The layout rows run at ``steps`` and again, with their own sweep, at each of ``layout_steps``
(the kinds ``segmentation`` and ``segmentation-N-steps``): guidance on the x0 prediction gains
more from extra steps than PPAP does, so one step count would not tell the two apart.

Each guided row's scale comes from a sweep on other samples (another seed; other references for
segmentation), chosen as the classifier bench chooses (``common.choose_scale``: accuracy, then
FID) and as the dense bench does (the highest IoU). Stages under the work folder (``stages/``,
``samples/``, ``banks/noise-aware``), each skipped when re-run; ``results.json``, ``report.md``
and the two grids are written into the results folder. The report is ``bench.rgb_report``.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..bank_format import parameter_report
from ..banks import ExpertBank
from ..diffusion import Conditioning
from ..fashion_mnist import FASHION_MNIST_CLASSES
from ..fashion_rgb import COLOUR_NAMES, colour_fidelity, colour_prompt, garment_mask, load_fashion_rgb, nearest_colour
from ..guidance import GuidanceTerm
from ..guide_model import GuideModel
from ..images import labelled_grid, png_bytes, to_hwc_uint8
from ..io import PPAPError, atomic_write_bytes, read_json
from ..loading import load_experts, load_guide, load_pipeline, resolve_device
from ..metrics import features, fid
from .classifier_tables import bank_specs
from .common import Bench, bank_train_seconds, choose_scale, class_scores, group_means, machine, time_steps, train_or_load_bank
from .dense import segmentation_scores

CLASSIFICATION_ROWS = {
    "unguided": "unguided",
    "naive": "naive",
    "ppap-5": "ppap",
    "x0": "x0",
    "noise-aware": "noise-aware",
}  # row -> method
SEGMENTATION_ROWS = {"unguided": "unguided", "naive": "naive", "ppap-5": "ppap", "x0": "x0"}
NUM_CLASSES = len(FASHION_MNIST_CLASSES)


@dataclass(frozen=True)
class RGBBenchConfig:
    diffusion: str = "fashion-rgb-ddpm"
    guide: str = "fashion-rgb-classifier"
    experts: str = "fashion-rgb-ppap5"
    segmenter: str = "fashion-rgb-segmenter"
    segmenter_experts: str = "fashion-rgb-segmenter-ppap5"
    evaluator: str = "fashion-rgb-evaluator"
    prompt_template: int = 1  # ppap.fashion_rgb.PROMPT_TEMPLATES[1]: "a {colour} garment"
    cfg_scale: float = 3.0  # classifier-free guidance (1 = off)
    steps: int = 25  # sampling steps
    # every row's sampler: the pipeline's own DDPMScheduler (ancestral), as diffusers samples it.
    # DDIM-25 (eta 0) draws a skewed garment mix from this small model (the judge calls 31% of its
    # unguided samples bags, 1% sandals, sneakers or dresses each; docs/results.md)
    sampler: str = "ddpm"
    pairs: int = 80  # (colour, garment) pairs: the first N of ``pair_order`` (80 = all)
    per_pair: int = 10  # samples per pair in the main table
    sweep_pairs: int = 80  # scale sweep: the first N pairs, ``sweep_per_pair`` samples each, another seed
    sweep_per_pair: int = 2  # 160 samples a point: one sample per pair could not tell 97.5% from 98.75%
    # method -> scales, each grid wide enough that its best point is inside it
    sweep_scales: dict = field(
        default_factory=lambda: {
            "naive": (1.0, 3.0, 10.0, 30.0, 100.0),
            "ppap": (10.0, 30.0, 100.0, 300.0, 1000.0),
            "x0": (0.3, 1.0, 3.0, 10.0),
            "noise-aware": (3.0, 10.0, 30.0, 100.0),
        }
    )
    seg_targets: int = 200  # reference images for the segmentation rows (the first N colour test images)
    seg_sweep_targets: int = 48  # the next N, for the segmentation sweep
    seg_sweep_scales: dict = field(
        default_factory=lambda: {
            "naive": (30.0, 100.0, 300.0, 1000.0),
            "ppap": (30.0, 100.0, 300.0, 1000.0, 3000.0),
            "x0": (3.0, 10.0, 30.0, 100.0, 300.0),
        }
    )
    layout_steps: tuple[int, ...] = (50,)  # the segmentation rows also run at these step counts, each with its own sweep
    expert_iterations: int = 800  # the noise-aware model: the classifier bench's bank at this budget (5x as many steps, one model)
    labelled_images: int | None = None  # its labelled colour training images (None: all 60,000)
    real_images: int | None = None  # real colour test images the FID compares against (None: all 10,000)
    grid_pairs: int = 6  # pairs (and segmentation references) shown in the grids
    cost_batch: int = 16
    cost_repeats: int = 5
    batch_size: int = 100  # sampling batch
    seed: int = 6000  # main table noises
    sweep_seed: int = 7000  # sweep noises (disjoint from the main table's)
    colour_seed: int = 0  # colour Fashion-MNIST's colour draw
    device: str = "cpu"  # where the models sample (the evaluator scores on the CPU)


QUICK = RGBBenchConfig(
    steps=3,
    pairs=8,
    per_pair=1,
    sweep_pairs=4,
    sweep_per_pair=1,
    sweep_scales={"naive": (10.0, 30.0), "ppap": (10.0, 30.0), "x0": (3.0,), "noise-aware": (10.0,)},
    seg_targets=4,
    seg_sweep_targets=2,
    seg_sweep_scales={"naive": (300.0,), "ppap": (300.0, 1000.0), "x0": (100.0,)},
    layout_steps=(2,),
    expert_iterations=2,
    labelled_images=64,
    real_images=64,
    grid_pairs=3,
    cost_batch=2,
    cost_repeats=1,
    batch_size=8,
)


def pair_order(n: int = 80) -> list[tuple[int, int]]:
    """The first ``n`` (colour, class) pairs of an order in which every 10 consecutive pairs hold
    each class once and every 8 each colour once: pair j is class j % 10 in colour (3 (j // 10) +
    j) % 8, all 80 pairs for j < 80 (3 is prime to 8)."""
    if not 1 <= n <= 80:
        raise PPAPError(f"pairs must be 1..80 (8 colours x 10 classes), got {n}")
    return [((3 * (j // 10) + j) % 8, j % 10) for j in range(n)]


class PooledEvaluator(nn.Module):
    """A transformers image classifier (a ``GuideModel``) as ``ppap.metrics`` takes an evaluator:
    ``forward``: logits [B, K] of images in [-1, 1]; ``features``: its backbone's pooled output
    [B, D] (the embedding the classification head reads)."""

    def __init__(self, guide: GuideModel):
        super().__init__()
        self.guide = guide

    def forward(self, x: Tensor) -> Tensor:
        return self.guide(x)

    def features(self, x: Tensor) -> Tensor:
        return self.guide.net.base_model(self.guide.preprocess(x)).pooler_output.flatten(1)


def load_evaluator(ref: str) -> nn.Module:
    """The evaluator ``ref``: ppap's own models have ``features``; a transformers one is wrapped."""
    guide = load_guide(ref)
    return guide.net if hasattr(guide.net, "features") else PooledEvaluator(guide).eval()


class RGBBench(Bench):
    def __init__(self, cfg: RGBBenchConfig, out: Path, work_dir: Path | None = None, progress: bool = True):
        _check(cfg)
        self.device = resolve_device(cfg.device)
        # every model loads before the work folder is made: a bad reference leaves nothing behind
        self.pipe = load_pipeline(cfg.diffusion, device=self.device)
        self.diffusion = self.pipe.diffusion
        self.classifier = load_guide(cfg.guide).to(self.device)
        self.segmenter = load_guide(cfg.segmenter).to(self.device)
        self.bank = load_experts(cfg.experts, copy.deepcopy(self.classifier), self.diffusion).to(self.device).eval()
        self.seg_bank = load_experts(cfg.segmenter_experts, copy.deepcopy(self.segmenter), self.diffusion).to(self.device).eval()
        self.evaluator = load_evaluator(cfg.evaluator)
        self.test = load_fashion_rgb("test", seed=cfg.colour_seed)
        self._open(cfg, Path(work_dir or out), progress)
        self.results_dir = Path(out)
        self._real_features: Tensor | None = None
        self._noise_aware: ExpertBank | None = None

    @property
    def real_features(self) -> Tensor:  # type: ignore[override]  # computed when a stage first needs it
        if self._real_features is None:
            self._real_features = features(self.evaluator, self.test.images(slice(0, self.cfg.real_images)))
        return self._real_features

    # ---- models and conditions ---------------------------------------------------------------

    def noise_aware(self) -> ExpertBank:
        """The labelled noise-aware classifier: the classifier bench's bank, on colour images."""
        if self._noise_aware is None:

            def data() -> tuple[Tensor, Tensor]:
                train = load_fashion_rgb("train", seed=self.cfg.colour_seed)
                n = self.cfg.labelled_images
                return train.images(slice(0, n)), train.labels[:n]

            guide = load_guide(self.cfg.guide).to(self.device)  # a fresh net: the copy it fine-tunes
            spec = bank_specs(self.cfg.expert_iterations)["noise-aware"]
            self._noise_aware = train_or_load_bank(
                guide, self.diffusion, spec.train, self.out / "banks" / "noise-aware", data, self.progress
            )
        return self._noise_aware

    def noise_aware_info(self) -> dict:
        spec, rep = bank_specs(self.cfg.expert_iterations)["noise-aware"], parameter_report(self.noise_aware())
        return {
            "train": dataclasses.asdict(spec.train),
            "train_seconds": bank_train_seconds(self.out / "banks" / "noise-aware"),
            "trainable_parameters": int(rep["trainable_per_expert"] * rep["num_experts"]),
            "labelled_images": self.cfg.labelled_images or 60000,
        }

    @torch.no_grad()
    def conditioning(self, colours: Tensor) -> Conditioning:
        """Sample k's prompt: the prompt of colour ``colours[k]``, with classifier-free guidance."""
        prompts = [colour_prompt(c, self.cfg.prompt_template) for c in range(len(COLOUR_NAMES))]
        embeds, negative = self.pipe.encode_prompt(prompts, None, self.cfg.cfg_scale > 1)
        index = colours.to(embeds.device)
        cond = self.pipe.conditioning(
            len(colours),
            prompt_embeds=embeds[index],
            negative_prompt_embeds=None if negative is None else negative[index],
            guidance_scale=self.cfg.cfg_scale,
        )
        assert cond is not None
        return cond

    def classification_term(self, row: str, scale: float, targets: Tensor) -> GuidanceTerm | None:
        method = CLASSIFICATION_ROWS[row]
        experts = self.bank if method == "ppap" else self.noise_aware() if method == "noise-aware" else None
        return self.pipe.guidance_term(
            len(targets), guide=self.classifier, experts=experts, target=targets, method=method, classifier_scale=scale
        )

    def references(self, sweep: bool) -> tuple[Tensor, Tensor]:
        """Segmentation references: colour test images [N, 3, 32, 32] and the prompt colour of
        each (cycled over the 8 colours)."""
        n, s = self.cfg.seg_targets, self.cfg.seg_sweep_targets
        refs = self.test.images(slice(n, n + s) if sweep else slice(0, n))
        return refs, torch.arange(len(refs)) % len(COLOUR_NAMES)

    @torch.no_grad()
    def seg_targets(self, refs: Tensor) -> Tensor:
        """The segmenter's label maps [N, 32, 32] of reference images (as the dense bench's targets)."""
        out = torch.cat([self.segmenter(refs[k : k + 100].to(self.device)) for k in range(0, len(refs), 100)])
        return self.seg_bank.task.target_from_output(out).cpu()

    def segmentation_term(self, row: str, scale: float, targets: Tensor) -> GuidanceTerm | None:
        method = SEGMENTATION_ROWS[row]
        return self.pipe.guidance_term(
            len(targets), guide=self.segmenter, experts=self.seg_bank, target=targets, method=method, classifier_scale=scale
        )

    # ---- rows --------------------------------------------------------------------------------

    def classification_row(self, row: str, scale: float, sweep: bool) -> dict:
        """Row ``row`` at ``scale`` over the sweep's pairs and seed, or the main table's (whose
        samples are kept under ``samples/``)."""
        cfg = self.cfg
        pairs = pair_order(cfg.sweep_pairs if sweep else cfg.pairs)
        per = cfg.sweep_per_pair if sweep else cfg.per_pair
        colours = torch.tensor([c for c, _ in pairs]).repeat_interleave(per)
        targets = torch.tensor([y for _, y in pairs]).repeat_interleave(per)
        term = self.classification_term(row, scale, targets)
        x, seconds = self.sample(
            len(targets), term, cfg.sweep_seed if sweep else cfg.seed, f"{row} s={scale:g}", self.conditioning(colours)
        )
        out = {"scale": scale} | class_scores(self.evaluator, x, targets, NUM_CLASSES, self.real_features, full=not sweep)
        out |= _colour_scores(x, colours) | {"seconds": round(seconds, 1)}
        if not sweep:
            self._save_samples(f"classification-{row}", x, targets, colours)
        return out

    def segmentation_row(self, row: str, scale: float, sweep: bool, kind: str = "segmentation") -> dict:
        """Layout row ``row`` at ``scale`` over the sweep's references or the main table's, with
        the step count of ``kind`` (``segmentation``: ``steps``; ``segmentation-N-steps``: N)."""
        refs, colours = self.references(sweep)
        targets = self.seg_targets(refs)
        term = self.segmentation_term(row, scale, targets)
        x, seconds = self.sample(
            len(targets),
            term,
            self.cfg.sweep_seed if sweep else self.cfg.seed,
            f"{kind} {row} s={scale:g}",
            self.conditioning(colours),
            steps=kind_steps(kind, self.cfg.steps),
        )
        if not sweep:
            self._save_samples(f"{kind}-{row}", x, targets, colours)
        return {"scale": scale} | self._segmentation_scores(x, targets, colours) | {"seconds": round(seconds, 1)}

    def _segmentation_scores(self, x: Tensor, targets: Tensor, colours: Tensor) -> dict:
        per = segmentation_scores(x, targets, self.evaluator, foreground=garment_mask)
        out = {k: float(np.mean(v)) for k, v in per.items()} | _colour_scores(x, colours)
        return out | {"fid": fid(features(self.evaluator, x), self.real_features), "n": len(x)}

    def _save_samples(self, name: str, x: Tensor, targets: Tensor, colours: Tensor) -> None:
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, images=to_hwc_uint8(x), targets=targets.numpy(), colours=colours.numpy())
        atomic_write_bytes(self.out / "samples" / f"{name}.npz", buf.getvalue())

    def sweep_row(self, kind: str, row: str) -> list[dict]:
        scales = (self.cfg.sweep_scales if kind == "classification" else self.cfg.seg_sweep_scales)[_rows(kind)[row]]
        return [self._row(kind, row, s, sweep=True) for s in scales]

    def main_row(self, kind: str, row: str, scale: float) -> dict:
        return self._row(kind, row, scale, sweep=False)

    def _row(self, kind: str, row: str, scale: float, sweep: bool) -> dict:
        if kind == "classification":
            return self.classification_row(row, scale, sweep)
        return self.segmentation_row(row, scale, sweep, kind)

    # ---- stages ------------------------------------------------------------------------------

    def sweep_stage(self) -> dict:
        kinds = bench_kinds(self.cfg)
        jobs = {f"sweep-{kind}-{row}": ("sweep_row", (kind, row)) for kind in kinds for row in _guided(kind)}
        done = self.jobs("sweep", jobs)
        return {kind: {row: done[f"sweep-{kind}-{row}"] for row in _guided(kind)} for kind in kinds}

    def main_stage(self, sweep: dict) -> dict:
        jobs, kinds = {}, bench_kinds(self.cfg)
        for kind in kinds:
            for row in _rows(kind):
                scale = 0.0 if row == "unguided" else chosen_point(kind, sweep[kind][row])["scale"]
                jobs[f"main-{kind}-{row}"] = ("main_row", (kind, row, scale))
                self._forget_at_another_scale(f"main-{kind}-{row}", scale)
        done = self.jobs("main", jobs)
        return {kind: {row: done[f"main-{kind}-{row}"] for row in _rows(kind)} for kind in kinds}

    def _forget_at_another_scale(self, name: str, scale: float) -> None:
        """A main row cached at another scale than the sweep now chooses (a folder whose sweep
        stages were redone, or stages carried over from another run) is stale: it runs again."""
        if self.stage.exists(name) and read_json(self.stage.path(name), f"bench stage {name}")["scale"] != scale:
            self.stage.path(name).unlink()

    def cost_stage(self) -> dict:
        """Median seconds of one mid-noise DDIM step (with CFG) per row at ``cost_batch``, timed
        round-robin (``common.time_steps``), and as a ratio to the unguided step."""
        n = self.cfg.cost_batch
        colours, targets = torch.arange(n) % len(COLOUR_NAMES), torch.arange(n) % NUM_CLASSES
        cond = self.conditioning(colours).to(self.device)
        denoiser = self.diffusion.bind(cond)
        seg_targets = self.seg_targets(self.test.images(slice(0, n)))
        guides = {}
        for kind in ("classification", "segmentation"):
            for row in _guided(kind):
                term = (
                    self.classification_term(row, 1.0, targets)
                    if kind == "classification"
                    else self.segmentation_term(row, 1.0, seg_targets)
                )
                assert term is not None
                guides[f"{kind}/{row}"] = term.build(denoiser)
        seconds = time_steps(self.diffusion, {"unguided": None} | guides, n, self.cfg.steps, self.cfg.cost_repeats, cond=cond)
        base = seconds["unguided"]
        return {"batch": n} | {
            name: {"seconds_per_step": round(s, 4), "ratio_to_unguided": round(s / base, 2)} for name, s in seconds.items()
        }

    def real_reference(self) -> dict:
        """The table's measures for real colour training images: the floor a generator can reach."""
        train = load_fashion_rgb("train", seed=self.cfg.colour_seed)
        n = self.cfg.pairs * self.cfg.per_pair  # as many as a row's samples
        x, y, colours = train.images(slice(0, n)), train.labels[:n], train.colours[:n]
        return class_scores(self.evaluator, x, y, NUM_CLASSES, self.real_features, full=True) | _colour_scores(x, colours)

    def reference_scores(self) -> dict:
        """The segmentation measures for the reference images themselves (colour fidelity to
        their own colours): the ceiling of the IoU the garment mask and the segmenter allow."""
        refs = self.references(sweep=False)[0]
        return self._segmentation_scores(refs, self.seg_targets(refs), self.test.colours[: len(refs)])

    def grids(self) -> None:
        """The classification grid (a row per method, a column per pair: the first sample of the
        first ``grid_pairs`` pairs) and the segmentation grid (a row per method and step count
        after the references, a column per reference), from the saved samples."""
        k, per = self.cfg.grid_pairs, self.cfg.per_pair
        pairs = pair_order(self.cfg.pairs)[:k]
        cols = [f"{COLOUR_NAMES[c]} {FASHION_MNIST_CLASSES[y]}" for c, y in pairs]
        tiles = [self._load_samples(f"classification-{row}")[: len(pairs) * per : per] for row in CLASSIFICATION_ROWS]
        grid = labelled_grid(np.concatenate(tiles), list(CLASSIFICATION_ROWS), cols)
        atomic_write_bytes(self.results_dir / "bench_rgb_grid.png", png_bytes(grid))
        refs, colours = self.references(sweep=False)
        refs, colours = refs[:k], colours[:k]
        cols = [f"{COLOUR_NAMES[int(c)]}, layout #{i}" for i, c in enumerate(colours)]
        kinds = bench_kinds(self.cfg)[1:]
        names = [f"{row}, {kind_steps(kind, self.cfg.steps)} steps" for kind in kinds for row in SEGMENTATION_ROWS]
        tiles = [to_hwc_uint8(refs)] + [self._load_samples(f"{kind}-{row}")[:k] for kind in kinds for row in SEGMENTATION_ROWS]
        grid = labelled_grid(np.concatenate(tiles), ["reference"] + names, cols)
        atomic_write_bytes(self.results_dir / "bench_rgb_segmentation_grid.png", png_bytes(grid))

    def _load_samples(self, name: str) -> np.ndarray:
        with np.load(self.out / "samples" / f"{name}.npz") as f:
            return f["images"]

    def _run(self) -> dict:
        t0 = time.time()
        noise_aware = self.timed("noise-aware", self.noise_aware_info)
        kinds = bench_kinds(self.cfg)
        parts = [f"{kind}-{row}" for kind in kinds for row in _guided(kind)]
        sweep = self.timed_parts("sweep", self.sweep_stage, [f"sweep-{p}" for p in parts])
        mains = [f"main-{kind}-{row}" for kind in kinds for row in _rows(kind)]
        main = self.timed_parts("main", lambda: self.main_stage(sweep), mains)
        cost = self.timed("cost", self.cost_stage)
        real = self.timed("real", self.real_reference)
        results = {
            "config": dataclasses.asdict(self.cfg),
            "machine": machine() | {"device": str(self.device)},
            "noise_aware": noise_aware,
            "sweep": sweep,
            "main": main,
            "cost": cost,
            "real_reference": real,
            "reference_images": self.stage.get("references", self.reference_scores),
            "summary": summary(main),
            "stage_seconds": self.timings,
            "seconds_this_call": round(time.time() - t0, 1),
        }
        from .rgb_report import rgb_report  # the report reads this module's tables

        self.save_results(results, rgb_report(results), self.results_dir)
        self.grids()
        return results


def summary(main: dict) -> dict:
    """The table's headline figures: PPAP-5's accuracy, its ratio to the labelled noise-aware
    model's and to naive guidance's, the lowest colour fidelity of any row, PPAP-5's IoU (at
    ``steps``, and per layout kind)."""
    cls, seg = main["classification"], main["segmentation"]
    p5 = cls["ppap-5"]["accuracy"]
    return {
        "ppap5_accuracy": p5,
        "ppap5_over_noise_aware_accuracy": p5 / max(cls["noise-aware"]["accuracy"], 1e-9),
        "ppap5_over_naive_accuracy": p5 / max(cls["naive"]["accuracy"], 1e-9),
        "lowest_colour_fidelity": min(m["colour_fidelity"] for rows in main.values() for m in rows.values()),
        "segmentation_ppap5_iou": seg["ppap-5"]["iou"],
        "segmentation_ppap5_iou_by_kind": {kind: rows["ppap-5"]["iou"] for kind, rows in main.items() if kind != "classification"},
    }


def bench_kinds(cfg: RGBBenchConfig) -> list[str]:
    """The tables the bench runs: classification, the layout rows at ``steps``, and the layout
    rows at each of ``layout_steps``."""
    return ["classification", "segmentation"] + [f"segmentation-{n}-steps" for n in cfg.layout_steps]


def kind_steps(kind: str, steps: int) -> int:
    """The sampling steps of a table: N for ``segmentation-N-steps``, else the bench's ``steps``."""
    return int(kind.split("-")[1]) if kind.endswith("-steps") else steps


def chosen_point(kind: str, points: list[dict]) -> dict:
    """The sweep point a row runs at: the classifier bench's choice (accuracy, then FID), or the
    dense bench's (the highest IoU)."""
    return choose_scale(points) if kind == "classification" else max(points, key=lambda p: p["iou"])


def _rows(kind: str) -> dict[str, str]:
    return CLASSIFICATION_ROWS if kind == "classification" else SEGMENTATION_ROWS


def _guided(kind: str) -> list[str]:
    return [row for row in _rows(kind) if row != "unguided"]


def _colour_scores(x: Tensor, colours: Tensor) -> dict:
    """Colour fidelity, overall and per prompt colour (None for a colour no sample asked for)."""
    hit = (nearest_colour(x) == colours).float()
    per = group_means(hit, colours, len(COLOUR_NAMES))
    return {"colour_fidelity": colour_fidelity(x, colours), "per_colour_fidelity": dict(zip(COLOUR_NAMES, per))}


def _check(cfg: RGBBenchConfig) -> None:
    """Refuse a configuration that cannot run, in one line, before anything loads."""
    pair_order(cfg.pairs), pair_order(cfg.sweep_pairs)
    for name in ("per_pair", "sweep_per_pair", "steps", "seg_targets", "seg_sweep_targets", "batch_size", "cost_batch"):
        if getattr(cfg, name) < 1:
            raise PPAPError(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for n in cfg.layout_steps:
        if not (isinstance(n, int) and n >= 1 and n != cfg.steps and cfg.layout_steps.count(n) == 1):
            raise PPAPError(f"layout-steps must be step counts >= 1 other than steps ({cfg.steps}), each once; got {n!r}")
    if cfg.pairs * cfg.per_pair < 4:  # precision / recall compare each sample's 3 nearest neighbours
        raise PPAPError(f"the main table needs at least 4 samples per row (pairs x per-pair), got {cfg.pairs * cfg.per_pair}")
    if not (np.isfinite(cfg.cfg_scale) and cfg.cfg_scale >= 1):
        raise PPAPError(f"cfg-scale must be a finite number >= 1 (1 = off), got {cfg.cfg_scale}")


def run_rgb_bench(
    out: Path, quick: bool = False, cfg: RGBBenchConfig | None = None, work_dir: Path | None = None, progress: bool = True
) -> dict:
    cfg = cfg or (QUICK if quick else RGBBenchConfig())
    return RGBBench(cfg, out, work_dir, progress=progress).run()
