"""``ppap generate``: a data-free training corpus, unguided samples of the diffusion model."""

from __future__ import annotations

from ..errors import PPAPError
from .common import accelerator, check_out, conditioning_from_flags, finite_number, pipeline_from_flags


def cmd_generate(args) -> int:
    """Data-free corpus: unguided samples of the diffusion model in atomic shards."""
    from ..batch_sampling import generate_corpus
    from ..corpus import check_corpus, corpus_spec, open_corpus, pending_shards, reuse_shards
    from ..distributed import every_rank, main_decides
    from ..schedulers import sampling_scheduler

    check_out(args.out)
    if finite_number(args.eta, "--eta") < 0:
        raise PPAPError(f"--eta must be >= 0, got {args.eta}")
    acc = accelerator()
    if args.device is None:
        args.device = str(acc.device)
    pipe = pipeline_from_flags(args)
    cond = conditioning_from_flags(args, args.num, pipe) if args.num >= 1 else None
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
