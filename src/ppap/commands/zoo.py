"""``ppap zoo``: list the shipped models, or train one with its recorded recipe."""

from __future__ import annotations

from pathlib import Path


def cmd_zoo(args) -> int:
    from .. import zoo

    if args.zoo_cmd == "list":
        for e in zoo.ZOO.values():
            print(f"{e.name:22s} {e.kind:10s} {'ready' if e.available else 'not built':9s} {e.description}")
        return 0
    from ..zoo_train import train_zoo_model

    train_zoo_model(
        args.name,
        work_root=Path(args.work_dir),
        data_dir=args.data_dir,
        out_root=None if args.into_package else Path(args.out),
        device=args.device,
        stop_after=args.stop_after,
    )
    return 0
