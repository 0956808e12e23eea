"""``ppap bench``: the comparison on the zoo (classifier, dense), the colour text-conditional models (rgb) and the cost at real sizes (scale)."""

from __future__ import annotations

from pathlib import Path

from ..errors import PPAPError
from .common import comma_ints


def _row_choice(text: str, check) -> tuple[str, ...] | str:
    """``--ablations`` / ``--extra-rows``: "all", "none" or a comma list of row names, which
    ``check`` refuses with a clear error for an unknown name, before anything loads."""
    choice = {"all": "all", "none": ()}.get(text)
    if choice is None:
        choice = tuple(n.strip() for n in text.split(",") if n.strip())
        check(choice)
    return choice


RGB_FLAGS = (
    "work_dir",
    "per_pair",
    "cfg_scale",
    "layout_steps",
    "diffusion",
    "guide",
    "experts",
    "segmenter",
    "segmenter_experts",
    "evaluator",
)


def cmd_bench(args) -> int:
    out = Path(args.out or f"runs/bench-{args.suite}{'-quick' if args.quick else ''}")
    if args.suite not in ("scale", "rgb") and args.device is not None:
        raise PPAPError("--device applies to `ppap bench scale` and `ppap bench rgb` only")
    if args.suite != "scale" and ((args.dtype, args.batch_sizes) != (None, None) or args.report_only):
        raise PPAPError("--dtype, --batch-sizes and --report-only apply to `ppap bench scale` only")
    given = [f"--{name.replace('_', '-')}" for name in RGB_FLAGS if getattr(args, name, None) is not None]
    if args.suite != "rgb" and given:
        raise PPAPError(f"{given[0]} applies to `ppap bench rgb` only")
    if args.suite != "search" and getattr(args, "config", None) is not None:
        raise PPAPError("--config applies to `ppap bench search` only")
    if args.suite == "rgb":
        if args.workers is not None or args.ablations is not None or args.extra_rows is not None:
            raise PPAPError("--workers, --ablations and --extra-rows apply to `ppap bench classifier` only")
        results = _run_rgb(args, out)
    elif args.suite == "classifier":
        import dataclasses

        from ..bench import QUICK, BenchConfig, classifier_report, run_classifier_bench

        cfg = QUICK if args.quick else BenchConfig()
        if args.workers is not None:
            if args.workers < 1:
                raise PPAPError(f"--workers must be >= 1 (got {args.workers})")
            cfg = dataclasses.replace(cfg, workers=args.workers)
        from ..bench.classifier import ablation_names, table_rows

        if args.ablations is not None:
            cfg = dataclasses.replace(cfg, ablations=_row_choice(args.ablations, ablation_names))
        if args.extra_rows is not None:
            cfg = dataclasses.replace(cfg, extra_rows=_row_choice(args.extra_rows, table_rows))
        results = run_classifier_bench(out, cfg=cfg, progress=not args.quiet)
        print(classifier_report(results))
    elif args.workers is not None or args.ablations is not None or args.extra_rows is not None:
        raise PPAPError("--workers, --ablations and --extra-rows apply to `ppap bench classifier` only")
    elif args.suite == "search":
        from ..bench.search import run_search_bench, search_report

        results = run_search_bench(out, cfg=_search_config(args), progress=not args.quiet)
        print(search_report(results))
    elif args.suite == "scale":
        from ..bench.scale import run_scale_bench, scale_config, scale_report

        sizes = None if args.batch_sizes is None else comma_ints(args.batch_sizes, "--batch-sizes")
        cfg = scale_config(args.quick, args.device, args.dtype, sizes)
        results = run_scale_bench(out, cfg=cfg, progress=not args.quiet, report_only=args.report_only)
        print(scale_report(results))
    else:
        from ..bench import dense_report, run_dense_bench

        results = run_dense_bench(out, quick=args.quick, progress=not args.quiet)
        print(dense_report(results))
    print(f"results in {out}/ (results.json, report.md, figures); re-run to resume")
    return 0


def _run_rgb(args, out: Path) -> dict:
    import dataclasses

    from ..bench.rgb import QUICK, RGBBenchConfig, run_rgb_bench
    from ..bench.rgb_report import rgb_report

    cfg = QUICK if args.quick else RGBBenchConfig()
    given = {name: getattr(args, name) for name in RGB_FLAGS[1:] if getattr(args, name) is not None}
    if "layout_steps" in given:
        given["layout_steps"] = comma_ints(given["layout_steps"], "--layout-steps")
    cfg = dataclasses.replace(cfg, **given, **({"device": args.device} if args.device else {}))
    results = run_rgb_bench(out, cfg=cfg, work_dir=Path(args.work_dir) if args.work_dir else None, progress=not args.quiet)
    print(rgb_report(results))
    return results


def _search_config(args):
    """The search bench's configuration: the defaults (or --quick's), with a --config JSON file's
    fields on top (``SearchBenchConfig``'s names, e.g. {"num": 200, "budgets": [1, 4, 16]})."""
    import dataclasses

    from ..bench.search import QUICK, SearchBenchConfig, check_config
    from ..io import read_json

    cfg = QUICK if args.quick else SearchBenchConfig()
    if args.config is None:
        return cfg
    values = read_json(args.config, "search bench config")
    if not isinstance(values, dict):
        raise PPAPError(f"{args.config} must hold a JSON object of SearchBenchConfig fields, not a {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(SearchBenchConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PPAPError(f"{args.config}: unknown field {unknown[0]!r}; valid: {', '.join(fields)}")
    # JSON lists become the tuples the defaults are (the stages' configuration check compares them)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    cfg = dataclasses.replace(cfg, **values)
    check_config(cfg)
    return cfg
