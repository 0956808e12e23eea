"""``ppap`` command line: parsing, then library calls. Bad input ends in one line on stderr
(``ppap: error: ...``, exit status 2), never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .io import PPAPError, atomic_write_bytes


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _field_comments(cls) -> dict[str, str]:
    """The ``# comment`` after each field of a config dataclass: one source for docs and --help."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` flag per dataclass field, typed by its default, help from its comment."""
    helps = _field_comments(cls)
    group = parser.add_argument_group(f"{cls.__name__} (defaults shown)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ = _bool if isinstance(f.default, bool) else type(f.default)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", type=typ, default=None,
                           metavar=typ.__name__.upper() if typ is not _bool else "BOOL",
                           help=f"{helps.get(f.name, '')} [{f.default}]")


def config_from_args(cls, args: argparse.Namespace, **fixed):
    """Defaults <- --config JSON file <- explicit flags."""
    values = {}
    if getattr(args, "config", None):
        from .io import read_json

        values = read_json(args.config, "config file")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PPAPError(f"config file {args.config} has unknown key {sorted(unknown)[0]!r}")
    for f in dataclasses.fields(cls):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None:
            values[f.name] = v
    return cls(**(values | fixed))


def _accelerator():
    from accelerate import Accelerator

    # cpu=True on a GPU-less machine makes `accelerate launch --multi_gpu` start a gloo
    # process group (MULTI_CPU) instead of silently running N independent copies
    return Accelerator(cpu=not torch.cuda.is_available())


def _save_sample_outputs(out: Path, images: np.ndarray, targets: dict[str, np.ndarray], nrow: int) -> None:
    from PIL import Image

    from .pipeline import image_grid

    grid = image_grid(images, nrow)
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    npz = io.BytesIO()
    np.savez(npz, images=images, **targets)
    atomic_write_bytes(out.with_suffix(".npz"), npz.getvalue())
    atomic_write_bytes(out, buf.getvalue())


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    """Data-free corpus: unguided DDIM samples of the diffusion model in atomic shards."""
    from .data import open_corpus
    from .pipeline import corpus_spec, generate_corpus, load_diffusion

    acc = _accelerator()
    diffusion = load_diffusion(args.diffusion).to(acc.device)
    spec = corpus_spec(diffusion, args.diffusion, args.num, shard_size=args.shard_size, steps=args.steps, eta=args.eta, seed=args.seed)
    if acc.is_main_process:
        open_corpus(args.out, spec)  # one process creates the manifest (or refuses a different corpus)
    acc.wait_for_everyone()
    written = generate_corpus(diffusion, args.out, spec, batch_size=args.batch_size, rank=acc.process_index,
                              world=acc.num_processes, progress=not args.quiet)
    acc.wait_for_everyone()
    if not args.quiet:
        print(f"corpus {args.out}: {spec.num_samples} images in {spec.num_shards} shards ({written} written by rank {acc.process_index})")
    return 0


def _load_training_data(args, task_name: str):
    from .data import load_corpus, load_fashion_mnist

    if args.data == "fashion-mnist":
        x, y = load_fashion_mnist("train", args.data_dir)
        return (x[: args.limit], y[: args.limit]) if args.limit else (x, y)
    return load_corpus(args.data, limit=args.limit), None


def cmd_train(args) -> int:
    from .experts import TimestepRouter, make_bank, parameter_report
    from .pipeline import load_diffusion, load_guide, task_for
    from .train import TrainConfig, train_experts

    cfg = config_from_args(TrainConfig, args)
    diffusion = load_diffusion(args.diffusion)
    guide = load_guide(args.guide, args.guide_weights)
    task = task_for(guide, diffusion.image_shape, args.task, tau=cfg.tau)
    router = TimestepRouter.parse(cfg.experts, diffusion.schedule.num_train_timesteps, diffusion.schedule.alphas_cumprod)
    if args.dry_run:
        print(json.dumps({"train": dataclasses.asdict(cfg), "task": dataclasses.asdict(task),
                          "boundaries": list(router.boundaries)}, indent=2))
        return 0
    images, labels = _load_training_data(args, task.name)
    if images.shape[1:] != diffusion.image_shape:
        raise PPAPError(f"training images have shape {list(images.shape[1:])} but the diffusion model makes {list(diffusion.image_shape)}")
    bank = make_bank(guide.net, router, cfg.adapter_config(), seed=cfg.seed)
    acc = _accelerator()
    if acc.is_main_process and not args.quiet:
        rep = parameter_report(bank)
        print(f"{rep['num_experts']} {cfg.adapter} experts, {rep['trainable_per_expert']:,} trainable parameters each "
              f"({rep['fraction_per_expert']:.2%} of the {rep['backbone_parameters']:,}-parameter backbone)")
    stats = train_experts(bank, task, diffusion.schedule, images, cfg, args.out, labels=labels,
                          identity=guide.identity, accelerator=acc, progress=not args.quiet)
    if acc.is_main_process and not args.quiet:
        for name, s in stats.items():
            print(f"{name} t∈[{s['range'][0]},{s['range'][1]}): loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} ({s['seconds']} s)")
        print(f"experts saved in {args.out}")
    return 0


def cmd_sample(args) -> int:
    from .guidance import Calibration
    from .pipeline import build_term, compose, load_diffusion, parse_term, sample_images, to_hwc_uint8

    torch.manual_seed(args.seed)  # for any third-party randomness; ppap's own noise is seeded per sample
    if args.num < 1:
        raise PPAPError(f"--num must be >= 1, got {args.num}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise PPAPError(f"--out must be a .png path (the .npz goes beside it), got {out}")
    diffusion = load_diffusion(args.diffusion)
    terms = []
    if args.guide:
        terms.append(build_term(diffusion, args.num, guide=args.guide, guide_weights=args.guide_weights, experts=args.experts,
                                method=args.method, task=args.task, target=args.target, target_image=args.target_image,
                                target_map=args.target_map, scale=args.scale, calibration=Calibration.parse(args.calibration)))
    elif args.experts:
        raise PPAPError("--experts needs --guide (the off-the-shelf model they adapt)")
    elif args.method != "unguided" and not args.term:
        raise PPAPError(f"method {args.method!r} needs --guide")
    for spec in args.term:
        kw = parse_term(spec)
        kw.setdefault("method", args.method)
        kw["calibration"] = Calibration.parse(kw.get("calibration", ""))
        terms.append(build_term(diffusion, args.num, **kw))
    x = sample_images(diffusion, args.num, seed=args.seed, make_guide=compose(terms), targets=torch.arange(args.num), steps=args.steps,
                      sampler=args.sampler, eta=args.eta, batch_size=args.batch_size, progress=not args.quiet,
                      desc=" + ".join(t.description for t in terms) or "unguided sampling")
    targets = {"targets": terms[0].targets.numpy() if terms else np.full(args.num, -1)}
    targets |= {f"targets_{k}": t.targets.numpy() for k, t in enumerate(terms[1:], start=1)}
    _save_sample_outputs(out, to_hwc_uint8(x), targets, nrow=args.nrow)
    if not args.quiet:
        print(f"wrote {out} and {out.with_suffix('.npz')} ({args.num} images; guidance: {' + '.join(t.description for t in terms) or 'none'})")
    return 0


def cmd_zoo(args) -> int:
    from . import zoo

    if args.zoo_cmd == "list":
        for e in zoo.ZOO.values():
            print(f"{e.name:22s} {e.kind:10s} {'ready' if e.available else 'not built':9s} {e.description}")
        return 0
    from .zoo_train import train_zoo_model

    train_zoo_model(args.name, work_root=Path(args.work_dir), data_dir=args.data_dir)
    return 0


def cmd_bench(args) -> int:
    out = Path(args.out or f"runs/bench-{args.suite}{'-quick' if args.quick else ''}")
    if args.suite == "classifier":
        import dataclasses

        from .bench import QUICK, BenchConfig, classifier_report, run_classifier_bench

        cfg = QUICK if args.quick else BenchConfig()
        if args.workers is not None:
            if args.workers < 1:
                raise PPAPError(f"--workers must be >= 1 (got {args.workers})")
            cfg = dataclasses.replace(cfg, workers=args.workers)
        results = run_classifier_bench(out, cfg=cfg, progress=not args.quiet)
        print(classifier_report(results))
    else:
        if args.workers is not None:
            raise PPAPError("--workers applies to `ppap bench classifier` only")
        from .bench_dense import dense_report, run_dense_bench

        results = run_dense_bench(out, quick=args.quick, progress=not args.quiet)
        print(dense_report(results))
    print(f"results in {out}/ (results.json, report.md, figures); re-run to resume")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=Path(args.out), quick=args.quick, seed=args.seed)
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    p = argparse.ArgumentParser(prog="ppap", description="Practical plug-and-play guidance of diffusion models (PPAP).")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="draw a data-free corpus from a diffusion model")
    g.add_argument("--diffusion", required=True, help="zoo name or diffusers model directory")
    g.add_argument("--out", required=True, help="corpus directory (re-run to resume)")
    g.add_argument("--num", type=int, default=1000, help="number of images")
    g.add_argument("--steps", type=int, default=25, help="DDIM steps")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--shard-size", type=int, default=256, help="images per shard file")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train noise-range experts (PPAP, or supervised baselines)")
    t.add_argument("--diffusion", required=True, help="zoo name or diffusers model directory (its schedule is used)")
    t.add_argument("--guide", required=True, help="zoo name or package.module:function of the off-the-shelf model")
    t.add_argument("--guide-weights", help="safetensors weights for a factory --guide")
    t.add_argument("--task", default="classification", help="task of the guidance model")
    t.add_argument("--data", required=True, help="corpus directory from `ppap generate`, or 'fashion-mnist' (labelled)")
    t.add_argument("--data-dir", help="Fashion-MNIST folder (default $PPAP_DATA_DIR or Debian's)")
    t.add_argument("--limit", type=int, help="use only the first N images")
    t.add_argument("--out", required=True, help="experts directory (re-run to resume)")
    t.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    t.add_argument("--quiet", action="store_true")
    add_config_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample images, guided or not; writes a PNG grid and an .npz")
    s.add_argument("--diffusion", required=True, help="zoo name or diffusers model directory")
    s.add_argument("--guide", help="zoo name or package.module:function of the off-the-shelf model")
    s.add_argument("--guide-weights", help="safetensors weights for a factory --guide")
    s.add_argument("--experts", help="zoo name or directory from `ppap train` (for --method ppap)")
    s.add_argument("--method", default="ppap", help="unguided | naive | ppap | noise-aware | multi-expert-supervised | x0 | x0-shortcut")
    s.add_argument("--calibration", default="", help="x0-shortcut options, e.g. 'norm_temperature=2,softplus_beta=3,scale_schedule=sigma'")
    s.add_argument("--task", help="task of a --guide without experts (default: the zoo entry's, else classification)")
    s.add_argument("--target", default="0", help="class index or name, a comma list (cycled), or 'all'")
    s.add_argument("--target-image", help="segmentation/dense guides: reference image; the target is the clean model's output on it")
    s.add_argument("--target-map", help="segmentation/dense guides: target map .npy ([H,W] labels, [C,H,W] map, or a stack [N,...])")
    s.add_argument("--term", action="append", default=[], metavar="K=V,...",
                   help="an extra guidance term to add (composed guidance), e.g. "
                        "'guide=fashion-segmenter,experts=fashion-segmenter-ppap5,target-image=ref.png,scale=1000'; repeatable")
    s.add_argument("--scale", type=float, default=None,
                   help="guidance scale s (default: the zoo experts' measured best, else 30; docs/BENCHMARKS.md)")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--sampler", default="ddim", help="ddim | ddpm")
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=int, default=8, help="images per grid row")
    s.add_argument("--out", default="samples.png", help="PNG path; the .npz is written beside it")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sample)

    z = sub.add_parser("zoo", help="list or (re)train the shipped models")
    zsub = z.add_subparsers(dest="zoo_cmd", required=True)
    zsub.add_parser("list", help="list zoo models")
    zt = zsub.add_parser("train", help="train a zoo model with its recorded recipe (resumable)")
    zt.add_argument("name")
    zt.add_argument("--work-dir", default="runs/zoo", help="checkpoints for resuming")
    zt.add_argument("--data-dir", help="Fashion-MNIST folder")
    z.set_defaults(func=cmd_zoo)

    b = sub.add_parser("bench", help="the paper's comparison on the zoo (resumable; see docs/BENCHMARKS.md)")
    b.add_argument("suite", choices=("classifier", "dense"))
    b.add_argument("--out", help="results folder (default runs/bench-SUITE); re-run to resume")
    b.add_argument("--quick", action="store_true", help="a seconds-scale version (the test suite runs it)")
    b.add_argument("--workers", type=int, help="processes for the independent jobs, the cores split between them "
                   "(classifier suite; default 2, 1 = one process)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the whole data-free PPAP pipeline at small scale, with a report")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--quick", action="store_true", help="a 2-minute version")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except PPAPError as e:
        print(f"ppap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ppap: interrupted (finished shards/checkpoints are kept; re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
