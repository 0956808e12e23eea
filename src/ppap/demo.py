"""``ppap demo``: the whole data-free PPAP pipeline at small scale on the shipped zoo models.

1. sample an unlabelled corpus from fashion-ddpm (the data-free part: no Fashion-MNIST needed);
2. distill fashion-classifier into 5 LoRA noise-range experts on it;
3. guide DDIM sampling toward each class with: nothing, the off-the-shelf classifier on x_t
   (naive), the fresh experts, and the shipped full-scale experts (fashion-ppap5);
4. judge every sample with the independent fashion-evaluator (never used for guidance);
5. when the colour zoo models are built: the text-conditional figure in miniature, red sneakers
   ("a red garment" at CFG 3, guided to "sneaker" by fashion-rgb-ppap5) and blue garments in the
   layout of a reference (the segmenter's experts fashion-rgb-segmenter-ppap5), under the grid.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import zoo
from .batch_sampling import sample_images
from .fashion_rgb import COLOUR_NAMES, colour_fidelity
from .images import image_grid, labelled_grid, png_bytes, to_hwc_uint8
from .io import atomic_write_bytes, atomic_write_json
from .loading import load_experts, load_guide, load_pipeline
from .train import TrainConfig, data_free_experts


@dataclass(frozen=True)
class DemoConfig:
    corpus_size: int = 1000  # images drawn from the DDPM for distillation
    # the recipe its documented figures were measured with (rank 8, no warm start), not ppap train's newer default
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(experts="5", iterations=300, batch_size=64, lr=2e-3, rank=8, alpha=8, warm_start=False)
    )
    per_class: int = 10  # guided samples per class and method
    steps: int = 25  # DDIM steps
    scales: dict = field(default_factory=lambda: {"naive": 30.0, "ppap": 30.0})  # each best of the sweep in docs/results.md
    grid_per_class: int = 4  # images per class and method shown in the grid
    colour_per_row: int = 4  # images per cell of the colour row (when the colour zoo models are built)


FULL = DemoConfig()
QUICK = DemoConfig(
    corpus_size=256,
    train=TrainConfig(experts="5", iterations=60, batch_size=64, lr=3e-3, rank=8, alpha=8, warm_start=False),
    per_class=3,
    steps=20,
    colour_per_row=2,
)
# the colour row's models; the evaluator, when built too, judges the sneakers
COLOUR_MODELS = ("fashion-rgb-ddpm", "fashion-rgb-classifier", "fashion-rgb-ppap5", "fashion-rgb-segmenter", "fashion-rgb-segmenter-ppap5")
COLOUR_CFG = 3.0  # the prompts' classifier-free guidance scale
COLOUR_SAMPLER = "ddpm"  # the colour pipeline's own DDPMScheduler: DDIM-25 draws a skewed garment mix from this small model


def run_demo(out: Path, quick: bool = False, seed: int = 0, cfg: DemoConfig | None = None) -> dict:
    cfg = cfg or (QUICK if quick else FULL)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    out = Path(out)
    t_start = time.time()
    pipe = load_pipeline("fashion-ddpm", device="cpu")
    evaluator = load_guide("fashion-evaluator")
    classes = zoo.get("fashion-classifier").classes
    num_classes = len(classes)

    print(f"[1-2/4] data-free experts: {cfg.corpus_size} DDPM samples, 5 experts x {cfg.train.iterations} steps")
    t0 = time.time()
    fresh, _ = data_free_experts(
        pipe,
        "fashion-ddpm",
        load_guide("fashion-classifier"),
        out / ("work-quick" if quick else "work"),
        corpus_size=cfg.corpus_size,
        cfg=cfg.train,
    )
    t_experts = time.time() - t0

    targets = torch.arange(num_classes).repeat_interleave(cfg.per_class)
    naive_guide = load_guide("fashion-classifier")  # a separate copy: the bank above injected LoRA into its net
    terms = {
        "unguided": None,
        "naive": pipe.guidance_term(len(targets), guide=naive_guide, target=targets, method="naive", classifier_scale=cfg.scales["naive"]),
        "ppap (fresh experts)": pipe.guidance_term(
            len(targets), guide=naive_guide, experts=fresh, target=targets, classifier_scale=cfg.scales["ppap"]
        ),
    }
    if zoo.ZOO["fashion-ppap5"].available:
        zoo_bank = load_experts("fashion-ppap5", load_guide("fashion-classifier"), pipe.diffusion)
        terms["ppap (zoo experts)"] = pipe.guidance_term(
            len(targets), guide=naive_guide, experts=zoo_bank, target=targets, classifier_scale=cfg.scales["ppap"]
        )

    print(f"[3/4] guided sampling: {len(targets)} images per method, DDIM-{cfg.steps}")
    results, images = {}, {}
    for name, term in terms.items():
        t0 = time.time()
        x = sample_images(
            pipe,
            len(targets),
            seed=seed + 1,
            terms=[term] if term else [],
            batch_size=50,
            desc=name,
            num_inference_steps=cfg.steps,
            sampler="ddim",
        )
        seconds = time.time() - t0
        with torch.no_grad():
            pred = evaluator(x).argmax(-1)
        hit = (pred == targets).float()
        results[name] = {
            "accuracy": hit.mean().item(),
            "per_class": hit.view(num_classes, -1).mean(1).tolist(),
            "seconds": round(seconds, 1),
        }
        images[name] = to_hwc_uint8(x)

    colour = colour_row(cfg.colour_per_row, cfg.steps, seed)
    print("[4/4] writing report")
    grid = _method_grid(images, list(classes), cfg.per_class, cfg.grid_per_class)
    if colour is not None:
        grid = _stack(grid, colour[1])
    atomic_write_bytes(out / "grid.png", png_bytes(grid))
    summary = {
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "classes": list(classes),
        "methods": results,
        "experts_seconds": round(t_experts, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "judge": "fashion-evaluator (independent; chance = 10%)",
        "colour": colour[0] if colour is not None else {"skipped": "colour zoo models not built"},
    }
    atomic_write_json(out / "summary.json", summary)
    _print_table(results, classes, summary)
    return summary


def colour_row(num: int, steps: int, seed: int = 0) -> tuple[dict, np.ndarray] | None:
    """Red sneakers and blue garments in a reference layout from fashion-rgb-ddpm, ``num`` of each,
    unguided (CFG only) and with PPAP: (figures, their labelled grid); None, after one line
    saying so, when the colour zoo models are not built. The reference is the model's own
    unguided sample of "a white garment" (no data needed); the layout match is the foreground IoU
    that the segmenter finds (the guide's own view: not an independent judge); colour fidelity is
    the share of garments nearest to the prompt's colour (``fashion_rgb.colour_fidelity``)."""
    missing = [n for n in COLOUR_MODELS if not zoo.ZOO[n].available]
    if missing:
        print(f"[colour] skipped: the colour zoo models are not built in this install ({', '.join(missing)}; `ppap zoo train NAME`)")
        return None
    t0 = time.time()
    pipe = load_pipeline("fashion-rgb-ddpm", device="cpu")
    classifier, segmenter = load_guide("fashion-rgb-classifier"), load_guide("fashion-rgb-segmenter")
    draw = dict(seed=seed + 2, guidance_scale=COLOUR_CFG, num_inference_steps=steps, sampler=COLOUR_SAMPLER, progress=False)
    reference = sample_images(pipe, 1, prompt="a white garment", **draw)
    print(
        f"[colour] red sneakers and blue garments in a reference layout: {num} each, {COLOUR_SAMPLER.upper()}-{steps}, CFG {COLOUR_CFG:g}"
    )
    red, blue = "a red garment -> sneaker", "a blue garment -> layout"
    rows = {
        red: ("a red garment", "fashion-rgb-ppap5", classifier, {"target": "sneaker"}),
        blue: ("a blue garment", "fashion-rgb-segmenter-ppap5", segmenter, {"target_image": reference[0]}),
    }
    samples: dict[str, dict[str, torch.Tensor]] = {}
    for row, (prompt, experts, guide, target) in rows.items():
        bank = load_experts(experts, copy.deepcopy(guide), pipe.diffusion)
        term = pipe.guidance_term(num, guide=guide, experts=bank, **target)
        samples[row] = {
            "unguided (CFG)": sample_images(pipe, num, prompt=prompt, **draw),
            "ppap": sample_images(pipe, num, prompt=prompt, terms=[term], **draw),
        }
    sneaker = list(classifier.classes).index("sneaker")
    figures: dict = {"cfg_scale": COLOUR_CFG, "per_row": num, "steps": steps}
    with torch.no_grad():
        if zoo.ZOO["fashion-rgb-evaluator"].available:
            judge = load_guide("fashion-rgb-evaluator")
            figures["sneaker_accuracy_by_evaluator"] = {
                m: (judge(x).argmax(-1) == sneaker).float().mean().item() for m, x in samples[red].items()
            }
        colours = {red: COLOUR_NAMES.index("red"), blue: COLOUR_NAMES.index("blue")}
        figures["colour_fidelity"] = {
            row: {m: colour_fidelity(x, torch.full((len(x),), colours[row])) for m, x in samples[row].items()} for row in rows
        }
        layout = segmenter(reference).argmax(1) > 0
        figures["layout_iou_by_segmenter"] = {m: _iou(segmenter(x).argmax(1) > 0, layout) for m, x in samples[blue].items()}
    figures["seconds"] = round(time.time() - t0, 1)
    blank = torch.full_like(reference, -1.0)
    refs = [torch.cat([blank] * num), torch.cat([reference] + [blank] * (num - 1))]  # the sneakers have no reference
    cells = [to_hwc_uint8(x) for r, row in zip(refs, samples.values()) for x in (r, *row.values())]
    grid = labelled_grid(np.stack([image_grid(c, nrow=num) for c in cells]), rows=list(rows), cols=["reference", *samples[red]])
    print(f"[colour] {figures}")
    return figures, grid


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean foreground IoU of masks a [N, H, W] against one reference mask b [1, H, W]."""
    inter, union = (a & b).flatten(1).sum(1), (a | b).flatten(1).sum(1)
    return (inter / union.clamp(min=1)).mean().item()


def _stack(top: np.ndarray, bottom: np.ndarray, gap: int = 12) -> np.ndarray:
    """Two uint8 [H, W, 1 or 3] images one above the other, as RGB on white."""
    top, bottom = (np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in (top, bottom))
    width = max(top.shape[1], bottom.shape[1])
    padded = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255) for a in (top, bottom)]
    return np.concatenate([padded[0], np.full((gap, width, 3), 255, np.uint8), padded[1]])


def _method_grid(images: dict[str, np.ndarray], classes: list[str], per_class: int, show: int) -> np.ndarray:
    """One labelled row per class, one labelled column per method; a cell holds ``show`` of that
    class's images [N, H, W, C] (``per_class`` per class, class-major) side by side."""
    show = min(show, per_class)
    cells = [image_grid(images[m][c * per_class : c * per_class + show], nrow=show) for c in range(len(classes)) for m in images]
    return labelled_grid(np.stack(cells), rows=classes, cols=list(images))


def _print_table(results: dict, classes, summary: dict) -> None:
    names = list(results)
    print("\nevaluator accuracy on the requested class (judge: fashion-evaluator, chance 10%)")
    header = f"{'class':<12}" + "".join(f"{n[:20]:>22}" for n in names)
    print(header)
    for c, cname in enumerate(classes):
        print(f"{cname[:12]:<12}" + "".join(f"{results[n]['per_class'][c]:>22.0%}" for n in names))
    print(f"{'ALL':<12}" + "".join(f"{results[n]['accuracy']:>22.1%}" for n in names))
    print(f"\nexperts trained in {summary['experts_seconds']} s; total {summary['total_seconds']} s")
