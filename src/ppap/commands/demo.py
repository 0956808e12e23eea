"""``ppap demo``: the whole data-free pipeline at small scale, with a report."""

from __future__ import annotations

from pathlib import Path


def cmd_demo(args) -> int:
    from ..demo import run_demo

    run_demo(out=Path(args.out), quick=args.quick, seed=args.seed)
    return 0
