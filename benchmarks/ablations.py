"""The ablation stage of ``ppap bench classifier`` (issue #13's levers and diagnosis) on its own.

It trains only what the ablations need (the main table's PPAP-5 and noise-aware banks, then one
bank per training lever) into the bench's own folder, so a later ``ppap bench classifier`` with
the same ``--out`` reuses every bank and row. The scales are given (the full bench takes them
from its sweep); a row at other scales is another row. Also prints the per-expert accuracy of
PPAP-5 on noised test images beside the noise-aware model's at the same t.

    python benchmarks/ablations.py --out runs/bench-classifier --scale 30 --noise-aware-scale 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ppap.bench.classifier import ClassifierBench
from ppap.bench.classifier_tables import BenchConfig, _ablations
from ppap.metrics import accuracy_under_noise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-classifier")
    p.add_argument("--scale", type=float, default=30.0, help="PPAP-5's guidance scale")
    p.add_argument("--noise-aware-scale", type=float, default=10.0)
    p.add_argument("--names", help="comma list of ablation names (default: all)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = BenchConfig(workers=args.workers)
    bench = ClassifierBench(cfg, Path(args.out))
    try:
        bench.corpus_stage()
        bench.jobs("banks", {f"bank-{k}": ("bank_info", (k,)) for k in ("noise-aware", "ppap5")})
        names = args.names.split(",") if args.names else list(_ablations(cfg.expert_iterations))
        rows = bench.ablation_stage(args.scale, args.noise_aware_scale, names)
    finally:
        if bench._pool is not None:
            bench._pool.shutdown()
    noise = bench.stage.get("diagnosis-noise", lambda: per_expert_noise(bench))
    print("| variant | scale | noisy acc. | guided acc. | worst class | FID | train s |")
    print("|---|---|---|---|---|---|---|")
    for name, a in rows.items():
        g, n = a["guided"], a["noisy_accuracy_mean"]
        print(
            f"| {name} | {g['scale']:g} | {'-' if n is None else f'{n:.1%}'} | {g['accuracy']:.1%} | {g['per_class_min']:.0%} | "
            f"{g['fid']:.1f} | {a['train_seconds']:.0f} |"
        )
    print(json.dumps(noise, indent=1))


def per_expert_noise(bench: ClassifierBench) -> dict:
    """Accuracy on noised real test images: each PPAP-5 expert inside its own range, routed
    PPAP-5, and the noise-aware model, at the same t."""
    x, y = bench.x_test[: bench.cfg.noise_images], bench.y_test[: bench.cfg.noise_images]
    sched = bench.diffusion.schedule
    ts = list(bench.cfg.noise_timesteps)
    ppap, aware = bench.bank("ppap5"), bench.bank("noise-aware")
    return {
        "timesteps": ts,
        "ppap-5 routed": accuracy_under_noise(ppap, sched, x, y, ts),
        "noise-aware": accuracy_under_noise(aware, sched, x, y, ts),
        "off-the-shelf": accuracy_under_noise(lambda xt, t: bench.naive(xt), sched, x, y, ts),
    }


if __name__ == "__main__":
    main()
