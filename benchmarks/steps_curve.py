"""Accuracy and FID against training steps: the labelled noise-aware model and the data-free
default recipe (issue #13's fallback when one budget does not settle the comparison).

Both are trained at several totals of optimiser steps (the noise-aware model: one model of N
steps; the recipe: 5 experts of N / 5 steps each, rank 32, warm-started chain, on the bench's
data-free corpus) and guide the main table's own 1,000 noises and targets at the main table's
scales. The 4,000-step points are the main table's banks; a bank the zoo already holds with the
same training configuration (``fashion-ppap5``: the recipe at 5 x 1,500 on the same corpus) is
used instead of training it again.

    python benchmarks/steps_curve.py --out runs/bench-classifier
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ppap.bench.classifier import PLAIN, BankSpec, BenchConfig, ClassifierBench, Row, _finished
from ppap.experts import load_bank
from ppap.io import atomic_write_json
from ppap.loading import experts_location, load_guide
from ppap.train import TrainConfig

MAIN = {"noise-aware": ("noise-aware", "noise-aware"), "recipe": ("ppap5-recipe", "ppap-5 (default recipe)")}  # bank, row
FULL = dict(PLAIN, adapter="full", lr=5e-4, objective="supervised")  # the main table's noise-aware training


def spec(method: str, total: int) -> BankSpec:
    if method == "noise-aware":
        return BankSpec(TrainConfig(experts="1", iterations=total, **FULL), "labelled")
    return BankSpec(TrainConfig(experts="5", iterations=total // 5), "corpus")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-classifier", help="the bench folder (its corpus and 4,000-step banks)")
    p.add_argument("--totals", default="1000,2000,4000,7500", help="total optimiser steps per point")
    p.add_argument("--noise-aware-totals", default="1000,2000,4000", help="the noise-aware model's points")
    p.add_argument("--scale", type=float, default=30.0, help="the recipe's scale (the main table's)")
    p.add_argument("--noise-aware-scale", type=float, default=10.0)
    p.add_argument("--reuse", default="fashion-ppap5", help="a zoo bank to use where its training matches a point")
    args = p.parse_args()
    bench = ClassifierBench(BenchConfig(workers=1), Path(args.out))
    targets = torch.arange(bench.task.num_classes).repeat_interleave(bench.cfg.per_class)
    reuse = experts_location(args.reuse) if args.reuse else None
    points = {"recipe": [int(t) for t in args.totals.split(",")], "noise-aware": [int(t) for t in args.noise_aware_totals.split(",")]}
    result_path = Path(args.out) / "extra" / "steps_curve.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(result_path.read_text()) if result_path.exists() else {}
    for method, totals in points.items():
        for total in totals:
            name = f"{method}-{total}"
            if name in done:  # resume: a finished point is kept
                continue
            s = spec(method, total)
            scale = args.noise_aware_scale if method == "noise-aware" else args.scale
            main_key, main_row = MAIN[method]
            main_stage = Path(args.out) / "stages" / f"main-{main_row}.json"
            if (
                _finished(bench.bank_dir(main_key), s.train)
                and main_stage.exists()
                and json.loads(main_stage.read_text())["scale"] == scale
            ):
                out, source = json.loads(main_stage.read_text()), f"{bench.bank_dir(main_key)} (the main table's row)"
            else:
                if reuse is not None and _finished(reuse, s.train):
                    bank, source = load_bank(load_guide(bench.cfg.guide), reuse, schedule=bench.diffusion.schedule).eval(), str(reuse)
                else:
                    bank, source = bench.train_bank(f"curve-{name}", s), str(bench.bank_dir(f"curve-{name}"))
                row = Row(name, "noise-aware" if method == "noise-aware" else "ppap")
                terms = [bench.term(row, scale, targets, experts=bank)]
                save = result_path.parent / f"curve-{name}.npz"
                out = bench.run_row(row, scale, bench.cfg.per_class, bench.cfg.seed, save=save, terms=terms)
            done[name] = out | {"method": method, "total_steps": total, "bank": source, "train": dataclasses.asdict(s.train)}
            atomic_write_json(result_path, done)
            print(
                f"| {method} | {total} | {scale:g} | {out['accuracy']:.1%} | {out['per_class_min']:.0%} | {out['fid']:.2f} | {source} |",
                flush=True,
            )
    print("| model | total steps | scale | accuracy | worst class | FID | precision | recall |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(done.values(), key=lambda r: (r["method"], r["total_steps"])):
        print(
            f"| {r['method']} | {r['total_steps']} | {r['scale']:g} | {r['accuracy']:.1%} | {r['per_class_min']:.0%} | {r['fid']:.2f} "
            f"| {r['precision']:.2f} | {r['recall']:.2f} |"
        )


if __name__ == "__main__":
    main()
