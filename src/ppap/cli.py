"""``ppap`` command line: the parser, then the command. Bad input ends in one line on stderr
(``ppap: error: ...``, exit status 2), never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import re
import sys
from collections.abc import Callable

from .errors import PPAPError

# Only argparse and ppap's torch-free modules at import time: `ppap --help`, every subcommand's
# --help and every argument error return without importing torch. A command's implementation
# (ppap.commands) is imported when it runs, and imports what it needs.

SAMPLER_HELP = (  # the names of ppap.schedulers.SAMPLER_NAMES (not imported here: it loads diffusers)
    "ddim | ddpm | dpm++ (DPM-Solver++ multistep) | unipc | euler | euler-a (Euler ancestral) | heun: "
    "that diffusers scheduler, built from the model's scheduler config (default ddim, whatever the folder saved)"
)

# --------------------------------------------------------------------------------------------
# configuration flags
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
        typ = _bool if isinstance(f.default, bool) else float if f.default is None else type(f.default)
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"cfg_{f.name}",
            type=typ,
            default=None,
            metavar=typ.__name__.upper() if typ is not _bool else "BOOL",
            help=f"{helps.get(f.name, '')} [{f.default}]",
        )


def config_from_args(cls, args: argparse.Namespace, **fixed):
    """Defaults <- --config JSON file <- explicit flags."""
    values = {}
    if getattr(args, "config", None):
        from .io import read_json

        values = read_json(args.config, "config file")
        if not isinstance(values, dict):
            raise PPAPError(f"config file {args.config} must hold a JSON object of {cls.__name__} fields, not a {type(values).__name__}")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PPAPError(f"config file {args.config} has unknown key {sorted(unknown)[0]!r}")
    for f in dataclasses.fields(cls):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None:
            values[f.name] = v
    return cls(**(values | fixed))


# --------------------------------------------------------------------------------------------
# commands: each one's implementation is in ppap.commands, imported when it runs
# --------------------------------------------------------------------------------------------


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """``ppap NAME``: ``ppap.commands.NAME.cmd_NAME``, imported only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"{__package__}.commands.{name}"), f"cmd_{name}")(args)

    run.__name__ = run.__qualname__ = f"cmd_{name}"
    return run


cmd_generate = _command("generate")
cmd_train = _command("train")
cmd_sample = _command("sample")
cmd_zoo = _command("zoo")
cmd_bench = _command("bench")
cmd_demo = _command("demo")
cmd_ui = _command("ui")


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


MODEL_REF = "a folder, a zoo name or a hub id org/name[@revision]"


def add_revision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--revision",
        help="hub branch, tag or commit hash for every hub id given without its own @revision (default: main)",
    )


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Where the diffusion model runs, and the conditions of a conditional one."""
    group = parser.add_argument_group("diffusion model")
    group.add_argument("--device", help="cpu | cuda | cuda:N | mps (default: cuda when available)")
    group.add_argument("--dtype", help="UNet dtype: float32 | float16 | bfloat16 (guidance stays float32)")
    group.add_argument("--class-label", help="class-conditional UNet: class label(s), e.g. '3' or '0,1,2' (cycled)")
    group.add_argument("--prompt", help="text-conditional pipeline with a text encoder: the prompt of every image, e.g. 'a red garment'")
    group.add_argument("--negative-prompt", help="with --prompt and --cfg-scale > 1: the unconditional branch's prompt (default: empty)")
    group.add_argument(
        "--prompt-embeds",
        help="text-conditional UNet: safetensors file with 'prompt_embeds' [N, L, D] or [L, D] "
        "(cycled) and optionally 'negative_prompt_embeds'",
    )
    group.add_argument(
        "--negative-class-label",
        type=int,
        help="class-conditional UNet with --cfg-scale > 1: the model's null class, the label it was trained with for "
        "'no class' (DiT-style models: the last class embedding, num_class_embeds - 1); no default, a diffusers "
        "UNet does not record one",
    )
    group.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")


def build_parser() -> argparse.ArgumentParser:
    from .config import TrainConfig, describe_default_scales

    p = argparse.ArgumentParser(prog="ppap", description="Practical plug-and-play guidance of diffusion models (PPAP).")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="draw a data-free corpus from a diffusion model")
    g.add_argument("--diffusion", required=True, help=f"the diffusers model: {MODEL_REF}")
    g.add_argument("--out", required=True, help="corpus directory (re-run to resume)")
    g.add_argument("--num", type=int, default=1000, help="number of images")
    g.add_argument("--steps", type=int, default=25, help="sampling steps")
    g.add_argument("--sampler", default="ddim", help=SAMPLER_HELP)
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--shard-size", type=int, default=256, help="images per shard file")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--reuse", help="a finished corpus of these settings but another size: copy its whole shards instead of drawing them")
    g.add_argument("--quiet", action="store_true")
    add_model_flags(g)
    add_revision_flag(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train noise-range experts (PPAP, or supervised baselines)")
    t.add_argument("--diffusion", required=True, help=f"the diffusers model (its schedule is used): {MODEL_REF}")
    t.add_argument("--guide", required=True, help=f"the off-the-shelf model (transformers or zoo): {MODEL_REF}, or package.module:function")
    t.add_argument("--guide-weights", help="safetensors weights for a factory --guide")
    t.add_argument(
        "--task",
        help="task of the guidance model: classification | segmentation | dense (default: what the model says, else classification)",
    )
    t.add_argument("--device", help="cpu | cuda | cuda:N | mps (default: accelerate's device)")
    t.add_argument("--data", required=True, help="corpus directory from `ppap generate`, or 'fashion-mnist' (labelled)")
    t.add_argument("--data-dir", help="Fashion-MNIST folder (default $PPAP_DATA_DIR or Debian's)")
    t.add_argument("--limit", type=int, help="use only the first N images")
    t.add_argument("--out", required=True, help="experts directory (re-run to resume)")
    t.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    t.add_argument("--quiet", action="store_true")
    add_revision_flag(t)
    add_config_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample images, guided or not; writes a PNG grid and an .npz")
    s.add_argument("--diffusion", required=True, help=f"the diffusers model: {MODEL_REF}")
    s.add_argument("--guide", help=f"the off-the-shelf model (transformers or zoo): {MODEL_REF}, or package.module:function")
    s.add_argument("--guide-weights", help="safetensors weights for a factory --guide")
    s.add_argument("--experts", help="the experts (for --method ppap): folder from `ppap train`, zoo name or hub id org/name[@revision]")
    s.add_argument(
        "--method",
        default="ppap",
        help="unguided | naive | ppap | noise-aware | multi-expert-supervised | x0 | x0-shortcut; "
        "particle methods (with --particles): best-of-n | fk | tds | ppap-smc | ppap-fk",
    )
    s.add_argument(
        "--particles",
        type=int,
        help="K trajectories per image for a particle method (one returned; --scale is the exponent lambda of p(y|x)^lambda, "
        "1 = the exact conditional; classifiers only; --sampler ddpm, or ddim with --eta > 0)",
    )
    s.add_argument("--calibration", default="", help="x0-shortcut options, e.g. 'norm_temperature=2,softplus_beta=3,scale_schedule=sigma'")
    s.add_argument("--task", help="task of a --guide without experts (default: the zoo entry's, else classification)")
    s.add_argument("--target", help="class index or name, a comma list (cycled), or 'all' (default: class 0)")
    s.add_argument("--target-image", help="segmentation/dense guides: reference image; the target is the clean model's output on it")
    s.add_argument("--target-map", help="segmentation/dense guides: target map .npy ([H,W] labels, [C,H,W] map, or a stack [N,...])")
    s.add_argument(
        "--term",
        action="append",
        default=[],
        metavar="K=V,...",
        help="an extra guidance term to add (composed guidance), e.g. "
        "'guide=fashion-segmenter,experts=fashion-segmenter-ppap5,target-image=ref.png,scale=1000'; repeatable",
    )
    s.add_argument(
        "--scale",
        type=float,
        default=None,
        help="guidance scale s (default: the experts' recorded best, else per task and method, the zoo benchmarks' choice: "
        f"{describe_default_scales()}; docs/results.md)",
    )
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--sampler", default="ddim", help=SAMPLER_HELP)
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=int, default=8, help="images per grid row")
    s.add_argument("--out", default="samples.png", help="PNG path; the .npz is written beside it")
    s.add_argument("--quiet", action="store_true")
    add_model_flags(s)
    add_revision_flag(s)
    s.set_defaults(func=cmd_sample)

    z = sub.add_parser("zoo", help="list or (re)train the shipped models")
    zsub = z.add_subparsers(dest="zoo_cmd", required=True)
    zsub.add_parser("list", help="list zoo models")
    zt = zsub.add_parser("train", help="train a zoo model with its recorded recipe (resumable)")
    zt.add_argument("name")
    zt.add_argument("--work-dir", default="runs/zoo", help="checkpoints for resuming")
    zt.add_argument("--data-dir", help="Fashion-MNIST folder")
    zt.add_argument(
        "--device",
        default="cpu",
        help="where the diffusion models train (cpu, cuda, cuda:N, mps); the draws stay on the CPU, so a checkpoint resumes anywhere (default: %(default)s)",
    )
    zt.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="end this run after STEPS optimiser steps, checkpointed (diffusion models; time-sliced runs)",
    )
    where = zt.add_mutually_exclusive_group()
    where.add_argument("--out", default="runs/zoo-models", help="folder for the trained model, laid out as the zoo (default: %(default)s)")
    where.add_argument("--into-package", action="store_true", help="replace the model shipped inside the installed package (maintainers)")
    z.set_defaults(func=cmd_zoo)

    b = sub.add_parser(
        "bench",
        help="the paper's comparison on the zoo; the colour text-conditional models with CFG (rgb); cost at real sizes; particle methods at matched compute (search) (resumable; see docs/reproducing.md, docs/SCALE.md)",
    )
    b.add_argument("suite", choices=("classifier", "dense", "scale", "search", "rgb"))
    b.add_argument("--out", help="results folder (default runs/bench-SUITE); re-run to resume")
    b.add_argument("--work-dir", help="rgb suite: the stages, samples and the noise-aware model (default: --out)")
    b.add_argument("--quick", action="store_true", help="a seconds-scale version (the test suite runs it)")
    b.add_argument("--config", help='search suite: a JSON file of SearchBenchConfig fields over the defaults, e.g. {"num": 200}')
    b.add_argument(
        "--workers",
        type=int,
        help="processes for the independent jobs, the cores split between them (classifier suite; default 2, 1 = one process)",
    )
    b.add_argument(
        "--ablations",
        help='classifier suite: also the ablation rows, "all" (the training levers and the diagnosis rows, docs/findings.md) or a comma list of rows (default: none)',
    )
    b.add_argument(
        "--extra-rows",
        help='classifier suite: also the main table\'s extra rows, "all" (ppap-10, x0-shortcut, x0-shortcut-calibrated) or a comma list (default: none)',
    )
    b.add_argument("--device", help="scale and rgb suites: cpu | cuda | cuda:N (default cpu)")
    b.add_argument("--dtype", help="scale suite: float32 | float16 | bfloat16 for the UNet and the guide (default float32)")
    b.add_argument("--batch-sizes", help="scale suite: comma list (default 1,8 on the CPU, 1,16,64 on a GPU)")
    b.add_argument(
        "--report-only", action="store_true", help="scale suite: the report of the stages finished so far; measures nothing, lists the rest"
    )
    rgb = b.add_argument_group("rgb suite (the colour text-conditional models; defaults: the zoo's fashion-rgb-* models)")
    rgb.add_argument("--per-pair", type=int, help="samples per (colour, garment) pair in the main table (default 10; --quick 1)")
    rgb.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 3)")
    rgb.add_argument(
        "--layout-steps",
        help="the segmentation rows also run at these step counts, each with its own sweep (comma-separated, '' for none; default 50)",
    )
    for flag, what in (
        ("diffusion", "the text-conditional pipeline"),
        ("guide", "the classifier"),
        ("experts", "the classifier's experts"),
        ("segmenter", "the segmenter"),
        ("segmenter-experts", "the segmenter's experts"),
        ("evaluator", "the evaluator"),
    ):
        rgb.add_argument(f"--{flag}", help=f"{what}: a folder or zoo name")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the whole data-free PPAP pipeline at small scale, with a report")
    d.add_argument("--out", default="demo_out", help="folder for grid.png, summary.json and the work to resume (default demo_out)")
    d.add_argument("--quick", action="store_true", help="a 2-minute version")
    d.add_argument("--seed", type=int, default=0, help="seed of the noises and the fresh experts (default 0)")
    d.set_defaults(func=cmd_demo)

    u = sub.add_parser("ui", help="a local web page comparing guidance methods side by side (needs ppap[ui])")
    u.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    u.add_argument("--port", type=int, default=7860, help="port; 0 picks a free one (the URL is printed)")
    u.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")
    u.add_argument("--device", help="cpu | cuda | cuda:N | mps (default: cpu)")
    u.set_defaults(func=cmd_ui)
    return p


def _close_progress_bars() -> None:
    """Close the bars an error left open (a bar is redrawn when it is closed or collected), so
    that the error is the last line the user sees."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@contextlib.contextmanager
def _library_progress_bars_off():
    """``--quiet``: the hub's, transformers' and diffusers' own bars (downloads, "Loading weights")
    off for the command, and as they were after it."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if are_progress_bars_disabled():  # the user's own setting (HF_HUB_DISABLE_PROGRESS_BARS): nothing to do
        yield
        return
    disable_progress_bars()  # transformers reads this when it is imported
    libraries = ("transformers.utils.logging", "diffusers.utils.logging")
    for name in libraries:  # the ones imported already (diffusers always keeps its own switch)
        if name in sys.modules or name.startswith("diffusers"):
            importlib.import_module(name).disable_progress_bar()
    try:
        yield
    finally:
        for name in libraries:
            if name in sys.modules:
                sys.modules[name].enable_progress_bar()
        enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted, 1 internal error
    (one line; the traceback only with ``--debug``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    try:
        with _library_progress_bars_off() if getattr(args, "quiet", False) else contextlib.nullcontext():
            return args.func(args)
    except PPAPError as e:
        _close_progress_bars()
        print(f"ppap: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("ppap: interrupted (finished shards/checkpoints are kept; re-run to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input
        _close_progress_bars()
        if args.debug:
            raise
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"ppap: internal error: {type(e).__name__}: {msg} (re-run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        from .distributed import leave_process_group

        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
