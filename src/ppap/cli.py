"""``ppap`` command line: parsing, then library calls. Bad input ends in one line on stderr
(``ppap: error: ...``, exit status 2), never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PPAPError

if TYPE_CHECKING:
    import numpy as np

# Only argparse and ppap's torch-free modules at import time: `ppap --help`, every subcommand's
# --help and every argument error return without importing torch; each command imports what it needs.

SAMPLER_HELP = (  # the names of ppap.schedulers.SAMPLER_NAMES (not imported here: it loads diffusers)
    "ddim | ddpm | dpm++ (DPM-Solver++ multistep) | unipc | euler | euler-a (Euler ancestral) | heun: "
    "that diffusers scheduler, built from the model's scheduler config (default ddim, whatever the folder saved)"
)

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


def _accelerator():
    import torch
    from accelerate import Accelerator

    # cpu=True on a GPU-less machine makes `accelerate launch --multi_gpu` start a gloo
    # process group (MULTI_CPU) instead of silently running N independent copies
    return Accelerator(cpu=not torch.cuda.is_available())


def _save_sample_outputs(out: Path, images: np.ndarray, targets: dict[str, np.ndarray], nrow: int) -> None:
    import numpy as np

    from .images import encode_png
    from .io import atomic_write_bytes

    png = encode_png(images, nrow)
    npz = io.BytesIO()
    np.savez(npz, images=images, **targets)
    atomic_write_bytes(out.with_suffix(".npz"), npz.getvalue())
    atomic_write_bytes(out, png)


def _sample_share(num: int, batch_size: int, rank: int, world: int) -> slice:
    """The samples that process ``rank`` of ``world`` draws: a run of whole batches of the
    one-process run (a batch's size changes how kernels round, so batches stay as they are)."""
    batches = -(-num // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return slice(min(first * batch_size, num), min(last * batch_size, num))


def _pipeline(args):
    from .loading import load_pipeline

    return load_pipeline(args.diffusion, device=args.device, dtype=args.dtype, revision=args.revision)


def _conditioning(args, num: int, pipe=None):
    """The UNet's conditions from ``--class-label`` / ``--negative-class-label`` /
    ``--prompt`` / ``--negative-prompt`` (encoded by ``pipe``'s text encoder) /
    ``--prompt-embeds`` / ``--cfg-scale``."""
    import torch

    from .diffusion import Conditioning
    from .io import load_safetensors

    labels = None
    if args.class_label:
        try:
            values = [int(v) for v in args.class_label.split(",")]
        except ValueError:
            raise PPAPError(f"bad --class-label {args.class_label!r}: use integers, e.g. '3' or '0,1,2' (cycled)") from None
        labels = torch.tensor([values[k % len(values)] for k in range(num)])
    embeds = negative = None
    if args.prompt_embeds:
        tensors = load_safetensors(args.prompt_embeds)
        if "prompt_embeds" not in tensors:
            raise PPAPError(f"{args.prompt_embeds} has no 'prompt_embeds' tensor (found: {', '.join(sorted(tensors)) or 'none'})")
        embeds, negative = tensors["prompt_embeds"].float(), tensors.get("negative_prompt_embeds")
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3:
            raise PPAPError(f"prompt_embeds in {args.prompt_embeds} must be [L, D] or [N, L, D], got {list(embeds.shape)}")
        embeds = embeds[torch.arange(num) % embeds.shape[0]]
        if negative is not None:
            negative = (negative[None] if negative.ndim == 2 else negative).float()
            negative = negative[torch.arange(num) % negative.shape[0]]
    if args.prompt is not None:
        if args.prompt_embeds:
            raise PPAPError("give --prompt or --prompt-embeds, not both")
        embeds, negative = pipe.encode_prompt(args.prompt, args.negative_prompt, args.cfg_scale > 1)
        embeds, negative = embeds.expand(num, -1, -1), None if negative is None else negative.expand(num, -1, -1)
    elif args.negative_prompt is not None:
        raise PPAPError("--negative-prompt needs --prompt")
    if labels is None and embeds is None:
        if args.cfg_scale != 1.0:
            raise PPAPError("--cfg-scale needs a conditional model's --class-label, --prompt or --prompt-embeds")
        return None
    null = args.negative_class_label
    if null is not None and labels is None:
        raise PPAPError("--negative-class-label needs --class-label")
    if null is None and labels is not None and embeds is None and args.cfg_scale > 1:
        raise PPAPError("--cfg-scale above 1 with --class-label needs --negative-class-label N, the model's null class")
    null_labels = None if null is None else torch.full((num,), null)
    return Conditioning(labels, embeds, negative, null_labels, args.cfg_scale)


def cmd_generate(args) -> int:
    """Data-free corpus: unguided samples of the diffusion model in atomic shards."""
    from .data import check_corpus, corpus_spec, generate_corpus, open_corpus, pending_shards, reuse_shards
    from .distributed import every_rank, main_decides
    from .schedulers import sampling_scheduler

    check_out(args.out)
    if _number(args.eta, "--eta") < 0:
        raise PPAPError(f"--eta must be >= 0, got {args.eta}")
    acc = _accelerator()
    if args.device is None:
        args.device = str(acc.device)
    pipe = _pipeline(args)
    cond = _conditioning(args, args.num, pipe) if args.num >= 1 else None
    spec = corpus_spec(
        pipe,
        args.diffusion,
        args.num,
        shard_size=args.shard_size,
        steps=args.steps,
        eta=args.eta,
        seed=args.seed,
        batch_size=args.batch_size,
        sampler=args.sampler,
        conditioning=cond,
    )
    sampling_scheduler(pipe.scheduler, args.sampler, args.steps)  # bad steps / sampler fail before anything is written

    def open_and_list() -> tuple[int, list[int]]:  # one process opens (or refuses) the corpus and lists what it lacks
        missing = open_corpus(args.out, spec)
        if not args.reuse:
            return 0, missing
        return reuse_shards(args.out, spec, args.reuse), pending_shards(args.out, spec)

    reused, missing = main_decides(acc, open_and_list)
    if args.reuse and acc.is_main_process and not args.quiet:
        print(f"reused {reused} shards of {args.reuse}")
    shares = [missing[r :: acc.num_processes] for r in range(acc.num_processes)]  # disjoint, from the one list
    written = every_rank(
        acc,
        lambda: generate_corpus(
            pipe, args.out, spec, conditioning=cond, shards=shares[acc.process_index], progress=acc.is_main_process and not args.quiet
        ),
    )
    main_decides(acc, lambda: check_corpus(args.out, spec))  # success only for a whole corpus
    if acc.is_main_process and not args.quiet:
        drawn = "; ".join(
            f"{n} written by rank {r}" + (f": shards {', '.join(map(str, shares[r]))}" if n and len(written) > 1 else "")
            for r, n in enumerate(written)
        )
        print(f"corpus {args.out}: {spec.num_samples} images in {spec.num_shards} shards ({drawn})")
    return 0


def check_out(path: str | Path, kind: str = "folder") -> Path:
    """``--out``: no file in the way of a folder (or a folder in the way of a file), checked
    before anything is computed or written."""
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise PPAPError(f"--out {path} is a file, not a folder")
    if kind == "file" and path.is_dir():
        raise PPAPError(f"--out {path} is a directory")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise PPAPError(f"--out {path}: {parent} is a file, not a folder")
    return path


def _load_training_data(args, task_name: str):
    from .data import load_corpus, load_fashion_mnist

    if args.limit is not None and args.limit < 1:
        raise PPAPError(f"--limit must be >= 1, got {args.limit}")
    if args.data == "fashion-mnist":
        x, y = load_fashion_mnist("train", args.data_dir)
        return (x[: args.limit], y[: args.limit]) if args.limit else (x, y)
    return load_corpus(args.data, limit=args.limit), None


def cmd_train(args) -> int:
    from .config import TrainConfig
    from .experts import TimestepRouter, make_bank, parameter_report
    from .loading import load_diffusion, load_guide, resolve_device
    from .tasks import task_for
    from .train import train_experts

    cfg = config_from_args(TrainConfig, args)
    check_out(args.out)
    if args.limit is not None and args.limit < 1:
        raise PPAPError(f"--limit must be >= 1, got {args.limit}")
    acc = _accelerator()
    device = resolve_device(args.device) if args.device else acc.device
    diffusion = load_diffusion(args.diffusion, revision=args.revision)  # its schedule and image shape; the UNet is not run
    schedule, image_shape = diffusion.schedule, diffusion.image_shape
    guide = load_guide(args.guide, args.guide_weights, task=args.task, revision=args.revision).to(device)
    task = task_for(guide, image_shape, args.task or guide.task or "classification", tau=cfg.tau)
    router = TimestepRouter.parse(cfg.experts, schedule.num_train_timesteps, schedule.alphas_cumprod)
    if args.dry_run:
        print(
            json.dumps(
                {"train": dataclasses.asdict(cfg), "task": dataclasses.asdict(task), "boundaries": list(router.boundaries)}, indent=2
            )
        )
        return 0
    images, labels = _load_training_data(args, task.name)
    if images.shape[1:] != image_shape:
        raise PPAPError(f"training images have shape {list(images.shape[1:])} but the diffusion model makes {list(image_shape)}")
    bank = make_bank(guide, router, cfg.adapter_config(), seed=cfg.seed)
    if acc.is_main_process and not args.quiet:
        rep = parameter_report(bank)
        print(
            f"{rep['num_experts']} {cfg.adapter} experts, {rep['trainable_per_expert']:,} trainable parameters each "
            f"({rep['fraction_per_expert']:.2%} of the {rep['backbone_parameters']:,}-parameter backbone)"
        )
        if getattr(bank, "skipped", None):
            print(f"left frozen (peft cannot adapt them at rank {cfg.rank}): {', '.join(bank.skipped)}")
    stats = train_experts(
        bank,
        task,
        schedule,
        images,
        cfg,
        args.out,
        labels=labels,
        identity={"ref": guide.ref},  # a hub id with the revision it was loaded at
        accelerator=acc if acc.num_processes > 1 else None,
        progress=not args.quiet,
    )
    if acc.is_main_process and not args.quiet:
        for name, s in stats.items():
            print(f"{name} t∈[{s['range'][0]},{s['range'][1]}): loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} ({s['seconds']} s)")
        print(f"experts saved in {args.out}")
    return 0


TERM_KEYS = ("guide", "guide_weights", "experts", "method", "task", "target", "target_image", "target_map", "scale", "calibration")


def parse_term(spec: str) -> dict[str, str]:
    """``'guide=fashion-classifier,experts=fashion-ppap5,target=ankle boot,scale=30'`` -> dict."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in TERM_KEYS:
            raise PPAPError(f"bad guidance term part {part!r}; use key=value with keys: {', '.join(sorted(TERM_KEYS))}")
        out[key] = value.strip()
    if "guide" not in out:
        raise PPAPError(f"guidance term {spec!r} has no guide=...")
    return out


def _number(value, what: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        raise PPAPError(f"bad {what} {value!r}: expected a number") from None
    if not math.isfinite(v):
        raise PPAPError(f"bad {what} {value!r}: expected a finite number")
    return v


def build_term(
    pipe,
    num: int,
    *,
    guide: str,
    guide_weights: str | None = None,
    experts: str | None = None,
    method: str = "ppap",
    task: str | None = None,
    target: str | None = None,
    target_image: str | None = None,
    target_map: str | None = None,
    scale=None,
    calibration: str = "",
    fit: str = "resize",
    revision: str | None = None,
):
    """Load what one guidance term names and resolve its ``num`` targets (``revision``: of the
    hub ids that name none of their own)."""
    import copy

    from .guidance import Calibration
    from .images import load_reference_image, load_target_map
    from .loading import load_experts, load_guide

    if target_image is not None and target_map is not None:
        raise PPAPError("give --target-image or --target-map, not both")
    model = load_guide(guide, guide_weights, task=task, revision=revision).to(pipe._execution_device)  # ours: it runs where the sample is
    bank = load_experts(experts, copy.deepcopy(model), pipe.diffusion, revision=revision) if experts else None
    image = load_reference_image(target_image, pipe.image_shape, fit) if target_image else None
    target_value = load_target_map(target_map) if target_map else target
    return pipe.guidance_term(
        num,
        guide=model,
        experts=bank,
        target=target_value,
        target_image=image,
        method=method,
        classifier_scale=_number(scale, "guidance scale"),
        calibration=Calibration.parse(calibration),
        task=task,
    )


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from . import zoo
    from .distributed import every_rank, main_decides
    from .images import to_hwc_uint8
    from .pipeline import sample_images
    from .schedulers import sampling_scheduler

    torch.manual_seed(args.seed)  # for any third-party randomness; ppap's own noise is seeded per sample
    if args.num < 1:
        raise PPAPError(f"--num must be >= 1, got {args.num}")
    if args.batch_size < 1 or args.nrow < 1:
        raise PPAPError(f"--batch-size and --nrow must be >= 1, got {args.batch_size} and {args.nrow}")
    _number(args.scale, "--scale")
    _number(args.eta, "--eta")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise PPAPError(f"--out must be a .png path (the .npz goes beside it), got {out}")
    check_out(out, "file")
    check_out(out.with_suffix(".npz"), "file")
    acc = _accelerator()
    if args.device is None and acc.num_processes > 1:
        args.device = str(acc.device)  # under `accelerate launch`: each process on its own device
    pipe = _pipeline(args)
    sampling_scheduler(pipe.scheduler, args.sampler, args.steps)  # one-line errors before loading guides
    cond = _conditioning(args, args.num, pipe)
    fit = zoo.ZOO[args.diffusion].reference_fit if zoo.is_zoo_name(args.diffusion) else "resize"
    terms = []
    if args.guide:
        terms.append(
            build_term(
                pipe,
                args.num,
                guide=args.guide,
                guide_weights=args.guide_weights,
                experts=args.experts,
                method=args.method,
                task=args.task,
                target=args.target,
                target_image=args.target_image,
                target_map=args.target_map,
                scale=args.scale,
                calibration=args.calibration,
                fit=fit,
                revision=args.revision,
            )
        )
    elif args.experts:
        raise PPAPError("--experts needs --guide (the off-the-shelf model they adapt)")
    elif args.method != "unguided" and not args.term:
        raise PPAPError(f"method {args.method!r} needs --guide")
    for spec in args.term:
        kw = parse_term(spec)
        kw.setdefault("method", args.method)
        terms.append(build_term(pipe, args.num, fit=fit, revision=args.revision, **kw))
    terms = [t for t in terms if t is not None]
    described = " + ".join(t.description for t in terms)
    mine = _sample_share(args.num, args.batch_size, acc.process_index, acc.num_processes)

    def draw() -> np.ndarray:  # this process's share, batch for batch as one process would draw it
        x = sample_images(
            pipe,
            mine.stop - mine.start,
            seed=args.seed,
            start=mine.start,
            terms=[t.select(mine) for t in terms],
            conditioning=cond.select(mine) if cond is not None else None,
            batch_size=args.batch_size,
            progress=acc.is_main_process and not args.quiet,
            desc=described or "unguided sampling",
            num_inference_steps=args.steps,
            sampler=args.sampler,
            eta=args.eta,
        )
        return to_hwc_uint8(x)

    images = np.concatenate(every_rank(acc, draw))  # every process's share, in sample order
    targets = {"targets": terms[0].targets.cpu().numpy() if terms else np.full(args.num, -1)}
    targets |= {f"targets_{k}": t.targets.cpu().numpy() for k, t in enumerate(terms[1:], start=1)}
    main_decides(acc, lambda: _save_sample_outputs(out, images, targets, nrow=args.nrow))  # one result, written once
    if not acc.is_main_process:
        return 0
    if not args.quiet:
        print(f"wrote {out} and {out.with_suffix('.npz')} ({args.num} images; guidance: {described or 'none'})")
    return 0


def cmd_zoo(args) -> int:
    from . import zoo

    if args.zoo_cmd == "list":
        for e in zoo.ZOO.values():
            print(f"{e.name:22s} {e.kind:10s} {'ready' if e.available else 'not built':9s} {e.description}")
        return 0
    from .zoo_train import train_zoo_model

    train_zoo_model(
        args.name, work_root=Path(args.work_dir), data_dir=args.data_dir, out_root=None if args.into_package else Path(args.out)
    )
    return 0


def _row_choice(text: str, check) -> tuple[str, ...] | str:
    """``--ablations`` / ``--extra-rows``: "all", "none" or a comma list of row names, which
    ``check`` refuses with a clear error for an unknown name, before anything loads."""
    choice = {"all": "all", "none": ()}.get(text)
    if choice is None:
        choice = tuple(n.strip() for n in text.split(",") if n.strip())
        check(choice)
    return choice


def cmd_bench(args) -> int:
    out = Path(args.out or f"runs/bench-{args.suite}{'-quick' if args.quick else ''}")
    if args.suite != "scale" and ((args.device, args.dtype, args.batch_sizes) != (None, None, None) or args.report_only):
        raise PPAPError("--device, --dtype, --batch-sizes and --report-only apply to `ppap bench scale` only")
    if args.suite == "classifier":
        import dataclasses

        from .bench import QUICK, BenchConfig, classifier_report, run_classifier_bench

        cfg = QUICK if args.quick else BenchConfig()
        if args.workers is not None:
            if args.workers < 1:
                raise PPAPError(f"--workers must be >= 1 (got {args.workers})")
            cfg = dataclasses.replace(cfg, workers=args.workers)
        from .bench.classifier import ablation_names, table_rows

        if args.ablations is not None:
            cfg = dataclasses.replace(cfg, ablations=_row_choice(args.ablations, ablation_names))
        if args.extra_rows is not None:
            cfg = dataclasses.replace(cfg, extra_rows=_row_choice(args.extra_rows, table_rows))
        results = run_classifier_bench(out, cfg=cfg, progress=not args.quiet)
        print(classifier_report(results))
    elif args.workers is not None or args.ablations is not None or args.extra_rows is not None:
        raise PPAPError("--workers, --ablations and --extra-rows apply to `ppap bench classifier` only")
    elif args.suite == "scale":
        from .bench.scale import run_scale_bench, scale_config, scale_report

        cfg = scale_config(args.quick, args.device, args.dtype, args.batch_sizes)
        results = run_scale_bench(out, cfg=cfg, progress=not args.quiet, report_only=args.report_only)
        print(scale_report(results))
    else:
        from .bench import dense_report, run_dense_bench

        results = run_dense_bench(out, quick=args.quick, progress=not args.quiet)
        print(dense_report(results))
    print(f"results in {out}/ (results.json, report.md, figures); re-run to resume")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=Path(args.out), quick=args.quick, seed=args.seed)
    return 0


def cmd_ui(args) -> int:
    from .ui import launch

    if not 0 <= args.port <= 65535:
        raise PPAPError(f"--port must be 0..65535 (0: a free port), got {args.port}")
    launch(args.host, args.port, share=args.share, device=args.device or "cpu")
    return 0


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
    s.add_argument("--method", default="ppap", help="unguided | naive | ppap | noise-aware | multi-expert-supervised | x0 | x0-shortcut")
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
    where = zt.add_mutually_exclusive_group()
    where.add_argument("--out", default="runs/zoo-models", help="folder for the trained model, laid out as the zoo (default: %(default)s)")
    where.add_argument("--into-package", action="store_true", help="replace the model shipped inside the installed package (maintainers)")
    z.set_defaults(func=cmd_zoo)

    b = sub.add_parser(
        "bench", help="the paper's comparison on the zoo; cost at real sizes (resumable; see docs/reproducing.md, docs/SCALE.md)"
    )
    b.add_argument("suite", choices=("classifier", "dense", "scale"))
    b.add_argument("--out", help="results folder (default runs/bench-SUITE); re-run to resume")
    b.add_argument("--quick", action="store_true", help="a seconds-scale version (the test suite runs it)")
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
    b.add_argument("--device", help="scale suite: cpu | cuda | cuda:N (default cpu)")
    b.add_argument("--dtype", help="scale suite: float32 | float16 | bfloat16 for the UNet and the guide (default float32)")
    b.add_argument("--batch-sizes", help="scale suite: comma list (default 1,8 on the CPU, 1,16,64 on a GPU)")
    b.add_argument(
        "--report-only", action="store_true", help="scale suite: the report of the stages finished so far; measures nothing, lists the rest"
    )
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the whole data-free PPAP pipeline at small scale, with a report")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--quick", action="store_true", help="a 2-minute version")
    d.add_argument("--seed", type=int, default=0)
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
