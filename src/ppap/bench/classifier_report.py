"""The classifier bench's report: ``report.md``'s tables and the two figures (the scale sweep,
accuracy under noise), from a results dict (``results.json``) alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..guidance import Calibration
from .classifier_tables import CALIBRATION_GRID, NOISE_MODELS, ROWS, STAGES, _ablations
from .common import _savefig, in_order, machine_in_order, pyplot, stage_times


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
    lines += ["", stage_times(r["stage_seconds"])]
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
