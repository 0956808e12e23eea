"""``ppap bench dense``: layout guidance with the zoo's dense off-the-shelf models.

For each task (segmentation with ``fashion-segmenter``, a depth-like dense map with
``fashion-edges``) the targets are the clean model's outputs on real test images (as the paper
does with DeepLabV3 / MiDaS on a reference image). Rows: unguided (shared), naive, x0, PPAP-5.
Every generated image is scored *without* the guiding model:
  * segmentation: IoU between the generated image's foreground (fixed threshold) and the target
    mask's foreground, and evaluator accuracy of the garment class the mask implies;
  * dense: L1 and Pearson correlation between the analytic Sobel map of the generated image and
    the target map.
FID (evaluator features, vs the test set) for every row, and the guided/unguided step cost.
Scales are chosen per (task, method) on separate targets and seeds. Stages resume like the
classifier bench.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..banks import ExpertBank
from ..guidance import GuidanceTerm
from ..images import labelled_grid, png_bytes, to_hwc_uint8
from ..io import atomic_write_bytes
from ..loading import load_experts, load_guide
from ..metrics import features, fid, predict
from ..models import FOREGROUND_THRESHOLD, sobel_magnitude
from .common import Bench, in_order, machine, machine_in_order, stage_times, time_steps

DENSE_MODELS = {  # task -> (the zoo's guide, its experts)
    "segmentation": ("fashion-segmenter", "fashion-segmenter-ppap5"),
    "dense": ("fashion-edges", "fashion-edges-ppap5"),
}
METHODS = ("naive", "x0", "ppap")


@dataclass(frozen=True)
class DenseBenchConfig:
    diffusion: str = "fashion-ddpm"
    evaluator: str = "fashion-evaluator"
    num_targets: int = 500  # real test images used as references (the first N)
    sweep_targets: int = 30  # further test images for the scale sweep (separate seed)
    sweep_scales: dict = field(
        default_factory=lambda: {
            # every method's chosen scale inside its grid, not at an end of it (the x0 rival included)
            "segmentation": {"naive": (100.0, 300.0, 1000.0), "x0": (30.0, 100.0, 300.0, 1000.0), "ppap": (100.0, 300.0, 1000.0, 3000.0)},
            "dense": {
                "naive": (1000.0, 3000.0, 10000.0, 30000.0),
                "x0": (1000.0, 3000.0, 10000.0, 30000.0),
                "ppap": (3000.0, 10000.0, 30000.0),
            },
        }
    )
    steps: int = 25
    batch_size: int = 100
    seed: int = 4000
    sweep_seed: int = 5000
    figure_targets: int = 4
    cost_batch: int = 64
    cost_repeats: int = 10


QUICK = DenseBenchConfig(
    num_targets=6,
    sweep_targets=2,
    steps=3,
    batch_size=6,
    figure_targets=2,
    cost_batch=4,
    cost_repeats=1,
    sweep_scales={
        "segmentation": {"naive": (300.0,), "x0": (100.0,), "ppap": (300.0,)},
        "dense": {"naive": (10000.0,), "x0": (3000.0,), "ppap": (10000.0,)},
    },
)


def _foreground(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] > FOREGROUND_THRESHOLD


def segmentation_scores(
    x: torch.Tensor, target: torch.Tensor, evaluator: nn.Module, foreground: Callable[[torch.Tensor], torch.Tensor] = _foreground
) -> dict:
    """Per-sample foreground IoU with the target mask (``foreground``: images -> [N, H, W]
    garment masks), and whether the evaluator sees the class the mask implies (its most
    frequent non-background label)."""
    fg, want = foreground(x), target != 0
    union = (fg | want).flatten(1).sum(1).clamp_min(1)
    iou = (fg & want).flatten(1).sum(1) / union
    implied = torch.tensor([int(torch.mode(m[m != 0]).values) - 1 if (m != 0).any() else -1 for m in target])
    pred = predict(evaluator, x).argmax(-1)
    return {"iou": iou.tolist(), "class_hit": (pred == implied).float().tolist()}


def dense_scores(x: torch.Tensor, target: torch.Tensor) -> dict:
    """Per-sample L1 and Pearson correlation between the analytic Sobel map of x and the target."""
    s, t = sobel_magnitude(x).flatten(1), target.flatten(1)
    sc, tc = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    r = (sc * tc).sum(1) / (sc.norm(dim=1) * tc.norm(dim=1)).clamp_min(1e-12)
    return {"l1": (s - t).abs().mean(1).tolist(), "pearson": r.tolist()}


class DenseBench(Bench):
    def __init__(self, cfg: DenseBenchConfig, out: Path, progress: bool = True):
        super().__init__(cfg, out, progress)
        self.models: dict[str, tuple[nn.Module, ExpertBank]] = {}  # task -> (clean guide, its PPAP-5 bank)
        for task_name, (guide_ref, experts_ref) in DENSE_MODELS.items():
            guide = load_guide(guide_ref)
            self.models[task_name] = (guide, load_experts(experts_ref, copy.deepcopy(guide), self.diffusion))

    def references(self, sweep: bool) -> torch.Tensor:
        n, s = self.cfg.num_targets, self.cfg.sweep_targets
        return self.x_test[n : n + s] if sweep else self.x_test[:n]

    def targets(self, task_name: str, refs: torch.Tensor) -> torch.Tensor:
        guide, bank = self.models[task_name]
        with torch.no_grad():
            return bank.task.target_from_output(torch.cat([guide(refs[k : k + 500]) for k in range(0, len(refs), 500)]))

    def term(self, task_name: str, method: str, scale: float, targets: torch.Tensor) -> GuidanceTerm | None:
        """``method``'s guidance toward ``targets`` (the bank's task for every method, as it is
        the task the clean model's targets are read with)."""
        guide, bank = self.models[task_name]
        return self.pipe.guidance_term(len(targets), guide=guide, experts=bank, target=targets, method=method, classifier_scale=scale)

    def sample_task(self, task_name: str, method: str, scale: float, targets: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
        return self.sample(len(targets), self.term(task_name, method, scale, targets), seed, desc=f"{task_name} {method} s={scale:g}")

    def score(self, task_name: str, x: torch.Tensor, targets: torch.Tensor) -> dict:
        per = segmentation_scores(x, targets, self.evaluator) if task_name == "segmentation" else dense_scores(x, targets)
        out = {k: float(np.mean(v)) for k, v in per.items()}
        return out | {"fid": fid(features(self.evaluator, x), self.real_features), "n": len(x)}

    @staticmethod
    def key_metric(task_name: str, scores: dict) -> float:
        """Higher is better: IoU for segmentation, minus L1 for the dense map."""
        return scores["iou"] if task_name == "segmentation" else -scores["l1"]

    def sweep_method(self, task_name: str, method: str, targets: torch.Tensor) -> list[dict]:
        """``method``'s scores at each of its sweep scales, on the sweep targets and seed."""
        return [
            self.score(task_name, self.sample_task(task_name, method, s, targets, self.cfg.sweep_seed)[0], targets) | {"scale": s}
            for s in self.cfg.sweep_scales[task_name][method]
        ]

    def sweep_stage(self) -> dict:
        out = {}
        refs = self.references(sweep=True)
        for task_name in DENSE_MODELS:
            targets = self.targets(task_name, refs)
            out[task_name] = {m: self.sweep_method(task_name, m, targets) for m in METHODS}
        return out

    def _sample_main(self, task_name: str, method: str, scale: float, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
        """A main-table row's samples, kept under ``samples/`` (for the unguided scores and the figure)."""
        x, seconds = self.sample_task(task_name, method, scale, targets, self.cfg.seed)
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        np.save(self.out / "samples" / f"{task_name}-{method}.npy", x.numpy().astype(np.float16))
        return x, seconds

    def main_row(self, task_name: str, method: str, scale: float) -> dict:
        targets = self.targets(task_name, self.references(sweep=False))
        x, seconds = self._sample_main(task_name, method, scale, targets)
        return self.score(task_name, x, targets) | {"scale": scale, "seconds": round(seconds, 1)}

    def main_stage(self, sweep: dict) -> dict:
        refs = self.references(sweep=False)
        first = next(iter(DENSE_MODELS))
        out = {}
        unguided = None
        for task_name in DENSE_MODELS:
            targets = self.targets(task_name, refs)
            rows = {}
            if unguided is None:  # the same unguided images serve both tasks (same noises, no target)
                unguided = self.stage.get(
                    "main-unguided-seconds",
                    lambda task_name=task_name, targets=targets: {"seconds": self._sample_main(task_name, "unguided", 0.0, targets)[1]},
                )
            x_u = torch.from_numpy(np.load(self.out / "samples" / f"{first}-unguided.npy").astype(np.float32))
            rows["unguided"] = self.score(task_name, x_u, targets) | {"scale": 0.0, "seconds": unguided["seconds"]}
            best = {m: max(sweep[task_name][m], key=lambda p: self.key_metric(task_name, p))["scale"] for m in METHODS}
            done = self.jobs(f"main {task_name}", {f"main-{task_name}-{m}": ("main_row", (task_name, m, best[m])) for m in METHODS})
            rows |= {m: done[f"main-{task_name}-{m}"] for m in METHODS}
            rows["reference images"] = self.score(task_name, refs, targets) | {"scale": None, "seconds": None}
            out[task_name] = rows
        return out

    def main_parts(self) -> list[str]:
        """The stage files the main table is made of."""
        return ["main-unguided-seconds"] + [f"main-{task_name}-{m}" for task_name in DENSE_MODELS for m in METHODS]

    def cost_stage(self) -> dict:
        """Median seconds of one mid-noise DDIM step per method (timed round-robin), as a ratio to
        an unguided step."""
        refs = self.x_test[: self.cfg.cost_batch]
        guides = {"unguided": None}
        for task_name in DENSE_MODELS:
            targets = self.targets(task_name, refs)
            for m in METHODS:
                guides[f"{task_name}/{m}"] = self.term(task_name, m, 1.0, targets).build(self.diffusion)
        seconds = time_steps(self.diffusion, guides, self.cfg.cost_batch, self.cfg.steps, self.cfg.cost_repeats)
        base = seconds.pop("unguided")
        return {"unguided_seconds": round(base, 4), "batch": self.cfg.cost_batch} | {
            name: round(t / base, 2) for name, t in seconds.items()
        }

    def figure(self, path: Path) -> None:
        """Per row, labelled with its task: a reference, its target map, then the unguided, naive
        and PPAP samples from the same initial noise."""
        from matplotlib import colormaps

        k = self.cfg.figure_targets
        refs = self.references(sweep=False)[:k]
        first = next(iter(DENSE_MODELS))
        tiles, rows = [], []
        for task_name in DENSE_MODELS:
            targets = self.targets(task_name, refs).numpy()
            if task_name == "segmentation":  # one tab20 colour per label
                maps = colormaps["tab20"](targets)
            else:  # each map stretched to its own range
                lo, hi = targets.min(axis=(1, 2, 3), keepdims=True), targets.max(axis=(1, 2, 3), keepdims=True)
                maps = colormaps["magma"](((targets - lo) / np.maximum(hi - lo, 1e-8))[:, 0])
            maps = (maps[..., :3] * 255).round().astype(np.uint8)
            samples = [
                np.load(self.out / "samples" / f"{first if m == 'unguided' else task_name}-{m}.npy")[:k].astype(np.float32)
                for m in ("unguided", "naive", "ppap")
            ]
            grey = [_rgb(refs)] + [_rgb(torch.from_numpy(x)) for x in samples]
            for r in range(k):
                tiles += [grey[0][r], maps[r]] + [g[r] for g in grey[1:]]
                rows.append(task_name)
        grid = labelled_grid(np.stack(tiles), rows, ["reference", "target map", "unguided", "naive", "ppap"])
        atomic_write_bytes(path, png_bytes(grid))

    def _run(self) -> dict:
        t0 = time.time()
        cost = self.timed("cost", self.cost_stage)
        sweep = self.timed("sweep", self.sweep_stage)
        main = self.timed_parts("main", lambda: self.main_stage(sweep), self.main_parts())
        results = {
            "config": dataclasses.asdict(self.cfg),
            "machine": machine(),
            "cost": cost,
            "sweep": sweep,
            "main": main,
            "stage_seconds": self.timings,
            "seconds_this_call": round(time.time() - t0, 1),
        }
        self.save_results(results, dense_report(results))
        self.figure(self.out / "bench_dense_grid.png")
        return results


def _rgb(x: torch.Tensor) -> np.ndarray:
    """Grey images [N, 1, H, W] in [-1, 1] -> uint8 RGB [N, H, W, 3]."""
    return np.repeat(to_hwc_uint8(x.float().clamp(-1, 1)), 3, axis=-1)


def _fmt_scale(scale) -> str:
    return "" if scale is None else f"{scale:g}"


def dense_report(r: dict) -> str:
    cfg, stage_seconds = r["config"], in_order(r["stage_seconds"], ("cost", "sweep", "main"))  # results.json sorts them
    lines = [
        f"Machine: {machine_in_order(r)}. DDIM-{cfg['steps']}, {cfg['num_targets']} targets per row from real test images; "
        f"scale per (task, method) from a sweep on {cfg['sweep_targets']} other targets and another seed.",
        "",
    ]
    rows = ("unguided",) + METHODS + ("reference images",)
    seg, dense = in_order(r["main"]["segmentation"], rows), in_order(r["main"]["dense"], rows)
    lines += [
        "Segmentation (target: fashion-segmenter's label map of a real test image):",
        "",
        "| method | scale | foreground IoU | evaluator acc. (class of the mask) | FID | step cost (x unguided) |",
        "|---|---|---|---|---|---|",
    ]
    for m, s in seg.items():
        cost = r["cost"].get(f"segmentation/{m}", 1.0 if m == "unguided" else None)
        lines.append(
            f"| {m} | {_fmt_scale(s['scale'])} | {s['iou']:.3f} | {s['class_hit']:.1%} | {s['fid']:.2f} | "
            f"{'' if cost is None else f'{cost:.2f}'} |"
        )
    lines += [
        "",
        "Dense map (target: fashion-edges' map of a real test image; scored with the analytic Sobel map):",
        "",
        "| method | scale | Sobel L1 (lower is better) | Pearson r | FID | step cost (x unguided) |",
        "|---|---|---|---|---|---|",
    ]
    for m, s in dense.items():
        cost = r["cost"].get(f"dense/{m}", 1.0 if m == "unguided" else None)
        lines.append(
            f"| {m} | {_fmt_scale(s['scale'])} | {s['l1']:.4f} | {s['pearson']:.3f} | {s['fid']:.2f} | "
            f"{'' if cost is None else f'{cost:.2f}'} |"
        )
    lines += [
        "",
        f"PPAP vs naive: IoU {seg['ppap']['iou']:.3f} vs {seg['naive']['iou']:.3f} ({seg['ppap']['iou'] - seg['naive']['iou']:+.3f}); "
        f"Sobel L1 {dense['ppap']['l1']:.4f} vs {dense['naive']['l1']:.4f} ({(dense['ppap']['l1'] / dense['naive']['l1'] - 1):+.1%}).",
        "",
        stage_times(stage_seconds),
    ]
    return "\n".join(lines) + "\n"


def run_dense_bench(out: Path, quick: bool = False, cfg: DenseBenchConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or (QUICK if quick else DenseBenchConfig())
    return DenseBench(cfg, out, progress=progress).run()
