"""Where `ppap bench classifier`'s time goes, and the least wall time its work can take.

Reads a finished bench folder: each job's own seconds (a bank's training, a sweep point's or a
main row's sampling, all in single-threaded workers) and each stage's wall time. The corpus is
not timed by the bench (its shards are the cache); it is the unguided main row's work scaled to
the corpus's size (both are unguided DDIM samples at the same steps). The floor is the job
seconds over the cores, as if the workers never waited for each other or for a stage's last
job: no schedule of this work on this machine is faster.

    python benchmarks/bench_time.py --out runs/bench-classifier
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-classifier", help="a finished bench folder")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores the floor divides the work over")
    args = p.parse_args()
    path = Path(args.out) / "results.json"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist: run `ppap bench classifier --out {args.out}` first")
    r = json.loads(path.read_text())
    cfg = r["config"]
    unguided = r["main"]["unguided"]
    per_sample = unguided["seconds"] / unguided["n"]  # one unguided sample at the bench's steps, one thread
    work = {
        "corpus (est.)": cfg["corpus_size"] * per_sample * cfg["corpus_steps"] / cfg["steps"],
        "banks": sum(b["train_seconds"] for b in r["banks"].values()),
        "sweep": sum(p["seconds"] for points in r["sweep"].values() for p in points),
        "main": sum(m["seconds"] for m in r["main"].values()),
    }
    wall = r["stage_seconds"]
    print(f"| stage | job seconds (one thread) | stage wall (s) | floor on {args.cores} cores (min) |")
    print("|---|---|---|---|")
    for stage, seconds in work.items():
        name = stage.split()[0]
        print(f"| {stage} | {seconds:,.0f} | {wall.get(name, '-')} | {seconds / args.cores / 60:.1f} |")
    rest = {k: v for k, v in wall.items() if k not in work and v}  # cost, noise (ablations, if run): timed whole
    for stage, seconds in rest.items():
        print(f"| {stage} | - | {seconds} | {seconds / 60:.1f} (its wall) |")
    total = sum(work.values()) / args.cores + sum(rest.values())
    print(f"\nfloor: {total / 60:.0f} min (job seconds / {args.cores} cores, plus the other stages' wall time)")


if __name__ == "__main__":
    main()
