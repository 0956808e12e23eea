"""``ppap sample``: guided or unguided images, written as a PNG grid and an .npz beside it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PPAPError
from .common import accelerator, check_out, conditioning_from_flags, finite_number, pipeline_from_flags
from .terms import build_term, parse_term

if TYPE_CHECKING:
    import numpy as np


def _save_sample_outputs(out: Path, images: np.ndarray, targets: dict[str, np.ndarray], nrow: int) -> None:
    import numpy as np

    from ..images import encode_png
    from ..io import atomic_write_bytes

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


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .. import zoo
    from ..batch_sampling import sample_images
    from ..distributed import every_rank, main_decides
    from ..images import to_hwc_uint8
    from ..schedulers import sampling_scheduler

    torch.manual_seed(args.seed)  # for any third-party randomness; ppap's own noise is seeded per sample
    if args.num < 1:
        raise PPAPError(f"--num must be >= 1, got {args.num}")
    if args.batch_size < 1 or args.nrow < 1:
        raise PPAPError(f"--batch-size and --nrow must be >= 1, got {args.batch_size} and {args.nrow}")
    finite_number(args.scale, "--scale")
    finite_number(args.eta, "--eta")
    _check_particles(args)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise PPAPError(f"--out must be a .png path (the .npz goes beside it), got {out}")
    check_out(out, "file")
    check_out(out.with_suffix(".npz"), "file")
    acc = accelerator()
    if args.device is None and acc.num_processes > 1:
        args.device = str(acc.device)  # under `accelerate launch`: each process on its own device
    pipe = pipeline_from_flags(args)
    sampling_scheduler(pipe.scheduler, args.sampler, args.steps)  # one-line errors before loading guides
    cond = conditioning_from_flags(args, args.num, pipe)
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
            **({} if args.particles is None else {"particles": args.particles}),
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


def _check_particles(args) -> None:
    """--particles goes with a particle method (and one needs it), before any model loads."""
    from ..config import PARTICLE_METHODS

    if args.method in PARTICLE_METHODS and (args.particles is None or args.particles < 1):
        raise PPAPError(f"--method {args.method} needs --particles K with K >= 1, got {args.particles}")
    if args.particles is not None and args.method not in PARTICLE_METHODS:
        raise PPAPError(f"--particles is for the particle methods ({', '.join(PARTICLE_METHODS)}), not --method {args.method}")
