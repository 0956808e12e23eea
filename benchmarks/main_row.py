"""One row of `ppap bench classifier`'s main table at a scale of your choice, on the table's own
initial noises and targets (seed and per-class count from the bench's configuration), reusing the
bench folder's trained banks. The bench picks each row's scale by its sweep (highest accuracy,
ties within 2 points to the lower FID); this shows the same row at another point of its
accuracy / FID curve, e.g. at the scale another row was given. ``--ablation`` puts an ablation's
bank (PPAP guidance with it, none of the ablation's inference changes) on the same noises instead.

    python benchmarks/main_row.py --row "ppap-5 (default recipe)" --scale 10
    python benchmarks/main_row.py --ablation "default recipe on real images (no labels)" --scale 30
    python benchmarks/main_row.py --row "ppap-5 (default recipe)" --scale 30 --interval 0,800
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ppap.bench.classifier import ClassifierBench
from ppap.bench.classifier_tables import ROWS, BenchConfig, Row, _ablations
from ppap.io import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-classifier", help="the bench folder (its banks must be trained)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--row", help="a main-table row name")
    which.add_argument("--ablation", help="an ablation whose bank guides (PPAP) instead")
    p.add_argument("--scale", type=float, required=True)
    p.add_argument("--interval", help="guide only for LO <= t < HI (LO,HI), as GuidanceTerm.interval")
    args = p.parse_args()
    interval = None
    if args.interval:
        try:
            lo, hi = (int(v) for v in args.interval.split(","))
        except ValueError:
            raise SystemExit(f"error: bad --interval {args.interval!r}: expected LO,HI (integers)") from None
        if not 0 <= lo < hi:
            raise SystemExit(f"error: bad --interval {args.interval!r}: expected 0 <= LO < HI")
        if args.row == "unguided":
            raise SystemExit("error: --interval needs a guided row, not 'unguided'")
        interval = (lo, hi)
    bench = ClassifierBench(BenchConfig(workers=1), Path(args.out))
    if args.row is not None:
        rows = {row.name: row for row in ROWS}
        if args.row not in rows:
            raise SystemExit(f"error: unknown row {args.row!r}; choose from: {', '.join(rows)}")
        row, key = rows[args.row], rows[args.row].bank
    else:
        table = _ablations(bench.cfg.expert_iterations)
        if args.ablation not in table:
            raise SystemExit(f"error: unknown ablation {args.ablation!r}; choose from: {', '.join(table)}")
        row, key = Row(args.ablation, "ppap"), bench.ablation_bank_key(args.ablation)
    if key and not (bench.bank_dir(key) / "ppap_experts.json").exists():
        raise SystemExit(f"error: {bench.bank_dir(key)} holds no trained bank: run `ppap bench classifier --out {args.out}` first")
    targets = torch.arange(bench.task.num_classes).repeat_interleave(bench.cfg.per_class)
    bank = bench.ablation_bank(args.ablation)[1] if args.ablation is not None else None
    term = bench.term(row, args.scale, targets, experts=bank)
    suffix = ""
    if interval is not None and term is not None:
        term, suffix = dataclasses.replace(term, interval=interval), f"-t{interval[0]}-{interval[1]}"
    terms = None if term is None else [term]
    path = Path(args.out) / "extra" / f"main-{row.name}-s{args.scale:g}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = bench.run_row(row, args.scale, bench.cfg.per_class, bench.cfg.seed, save=path.with_suffix(".npz"), terms=terms)
    atomic_write_json(path, result)
    print(json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}))
    print("per class:", " ".join(f"{a:.0%}" for a in result["per_class_accuracy"]))


if __name__ == "__main__":
    main()
