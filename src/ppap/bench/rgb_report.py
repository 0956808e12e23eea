"""The colour bench's report: ``report.md``'s tables from a results dict (``results.json``) alone."""

from __future__ import annotations

from ..fashion_mnist import FASHION_MNIST_CLASSES
from .common import in_order, machine_in_order, stage_times
from .rgb import CLASSIFICATION_ROWS, SEGMENTATION_ROWS, kind_steps

STAGES = ("noise-aware", "sweep", "main", "cost", "real")  # in the order they run


def rgb_report(r: dict) -> str:
    cfg, cost = r["config"], r["cost"]
    cls = in_order(r["main"]["classification"], CLASSIFICATION_ROWS)
    na = r["noise_aware"]
    lines = [
        f"Machine: {machine_in_order(r)}; sampling on {r['machine'].get('device', 'cpu')}. {cfg.get('sampler', 'ddim').upper()}-{cfg['steps']} with classifier-free "
        f"guidance {cfg['cfg_scale']:g} on the prompt's colour; the same initial noises for every row. Each guided row's scale is "
        "chosen on a sweep with another seed (classification: highest evaluator accuracy, then the lowest FID within 2 points; "
        "segmentation: the highest IoU).",
        "",
        f"Classification: {cfg['pairs']} (colour, garment) pairs x {cfg['per_pair']} samples per row (prompt "
        f'"a {{colour}} garment", the garment the target); evaluator accuracy, colour fidelity (the garment\'s mean colour nearest '
        f"the prompt's), FID / precision / recall in the evaluator's features against {cfg['real_images'] or 10000} real colour test "
        f"images; seconds per mid-noise sampling step at batch {cost['batch']} (with CFG).",
        "",
        "| method | scale | accuracy | worst class | colour fidelity | FID | precision | recall | s / step | step cost (x unguided) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in cls.items():
        c = cost.get(f"classification/{name}", cost["unguided"])
        lines.append(
            f"| {name} | {_scale(m, r['sweep']['classification'].get(name))} | {m['accuracy']:.1%} | {_worst(m)} | "
            f"{m['colour_fidelity']:.1%} | {m['fid']:.2f} | {m['precision']:.2f} | {m['recall']:.2f} | "
            f"{c['seconds_per_step']:.4f} | {c['ratio_to_unguided']:.2f} |"
        )
    real = r["real_reference"]
    lines.append(
        f"| *real training images* | | {real['accuracy']:.1%} | {_worst(real)} | {real['colour_fidelity']:.1%} | {real['fid']:.2f} | "
        f"{real['precision']:.2f} | {real['recall']:.2f} | | |"
    )
    s = r["summary"]
    lines += [
        "",
        f"ppap-5 accuracy / noise-aware: {s['ppap5_over_noise_aware_accuracy']:.3f}; ppap-5 / naive: {s['ppap5_over_naive_accuracy']:.2f}. "
        "The noise-aware "
        f"model is a full copy of the classifier fine-tuned with labels on {na['labelled_images']:,} noised colour training images "
        f"({na['train']['iterations']} steps, {na['train_seconds']:.0f} s, {na['trainable_parameters']:,} trainable parameters); "
        "ppap-5 used none.",
        "",
        f"Segmentation: {cfg['seg_targets']} reference silhouettes (the segmenter's label maps of real colour test images), the "
        "prompt's colour cycled over the 8 colours; foreground IoU of the garment pixels (brightest channel above 0.1 of full "
        "intensity) with the target's, colour fidelity, the evaluator's accuracy on the garment class the map implies. A table "
        "per step count, each with its own sweep; the cost of a sample is its steps times its step cost.",
    ]
    ref = r["reference_images"]
    for kind in (k for k in r["main"] if k != "classification"):
        lines += [
            "",
            f"{cfg.get('sampler', 'ddim').upper()}-{kind_steps(kind, cfg['steps'])}:",
            "",
            "| method | scale | foreground IoU | colour fidelity | evaluator acc. (class of the map) | FID | s / step | step cost (x unguided) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in in_order(r["main"][kind], SEGMENTATION_ROWS).items():
            c = cost.get(f"segmentation/{name}", cost["unguided"])
            lines.append(
                f"| {name} | {_scale(m, r['sweep'][kind].get(name))} | {m['iou']:.3f} | {m['colour_fidelity']:.1%} | "
                f"{m['class_hit']:.1%} | {m['fid']:.2f} | {c['seconds_per_step']:.4f} | {c['ratio_to_unguided']:.2f} |"
            )
        lines.append(
            f"| *reference images* | | {ref['iou']:.3f} | {ref['colour_fidelity']:.1%} | {ref['class_hit']:.1%} | {ref['fid']:.2f} | | |"
        )
    lines += [
        "",
        "Scales marked * are at an end of their sweep's grid (the best may lie beyond it).",
        "",
        stage_times(in_order(r["stage_seconds"], STAGES)),
    ]
    return "\n".join(lines) + "\n"


def _scale(m: dict, points: list[dict] | None) -> str:
    """The row's scale, starred at an end of its swept grid."""
    if not points:
        return "" if not m["scale"] else f"{m['scale']:g}"
    grid = sorted(p["scale"] for p in points)
    edge = len(grid) > 1 and m["scale"] in (grid[0], grid[-1])
    return f"{m['scale']:g}{'*' if edge else ''}"


def _worst(m: dict) -> str:
    """The lowest per-class accuracy and its class."""
    per = m["per_class_accuracy"]
    k = min((i for i, v in enumerate(per) if v is not None), key=lambda i: per[i])
    return f"{per[k]:.0%} ({FASHION_MNIST_CLASSES[k]})"
