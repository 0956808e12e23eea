"""One row of `ppap bench classifier`'s main table at a scale of your choice, on the table's own
initial noises and targets (seed and per-class count from the bench's configuration), reusing the
bench folder's trained banks. The bench picks each row's scale by its sweep (highest accuracy,
ties within 2 points to the lower FID); this shows the same row at another point of its
accuracy / FID curve, e.g. at the scale another row was given.

    python benchmarks/main_row.py --row "ppap-5 (default recipe)" --scale 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ppap.bench.classifier import ROWS, BenchConfig, ClassifierBench
from ppap.io import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-classifier", help="the bench folder (its banks must be trained)")
    p.add_argument("--row", required=True, help="a main-table row name")
    p.add_argument("--scale", type=float, required=True)
    args = p.parse_args()
    rows = {row.name: row for row in ROWS}
    if args.row not in rows:
        raise SystemExit(f"error: unknown row {args.row!r}; choose from: {', '.join(rows)}")
    row = rows[args.row]
    bench = ClassifierBench(BenchConfig(workers=1), Path(args.out))
    if row.bank and not (bench.bank_dir(row.bank) / "ppap_experts.json").exists():
        raise SystemExit(f"error: {bench.bank_dir(row.bank)} holds no trained bank: run `ppap bench classifier --out {args.out}` first")
    result = bench.run_row(row, args.scale, bench.cfg.per_class, bench.cfg.seed)
    path = Path(args.out) / "extra" / f"main-{row.name}-s{args.scale:g}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    print(json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}))
    print("per class:", " ".join(f"{a:.0%}" for a in result["per_class_accuracy"]))


if __name__ == "__main__":
    main()
