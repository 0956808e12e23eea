"""Many images, batch by batch, each seeded by its own index: sample k of a run seeded ``seed``
draws its noise from ``sample_seed(seed, k)`` alone, so that the batch size, the number of
processes and a resume point change no image. ``sample_images`` returns them; ``generate_corpus``
writes them as the shards of a corpus (``ppap.corpus``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .corpus import CORPUS_MANIFEST, CorpusSpec, open_corpus, pending_shards, write_shard
from .diffusion import Conditioning
from .guidance import GuidanceTerm
from .images import to_hwc_uint8
from .io import PPAPError
from .pipeline import PPAPPipeline


def sample_seed(seed: int, k: int) -> int:
    """The seed of sample k of a run seeded ``seed``: a sample's noise (x_T and every later
    draw) depends only on (seed, k), not on the batch size, the process count or a resume point."""
    digest = hashlib.sha256(f"ppap-noise:{seed}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_generators(seed: int, start: int, num: int) -> list[torch.Generator]:
    """CPU generators for samples start..start+num-1 (diffusers draws CPU noise and moves it, so
    that a seed gives the same x_T on every device)."""
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, start + j)) for j in range(num)]


def sample_images(
    pipe: PPAPPipeline,
    num: int,
    *,
    seed: int,
    batch_size: int = 64,
    start: int = 0,
    terms: Sequence[GuidanceTerm] | None = (),
    conditioning: Conditioning | None = None,
    progress: bool = True,
    desc: str = "sampling",
    **call_kwargs,
) -> Tensor:
    """``num`` images as float [N, C, H, W] in [-1, 1] (CPU), sample k seeded by ``sample_seed(seed,
    start + k)``. ``terms`` and ``conditioning`` hold per-sample targets / conditions for all
    ``num``; each batch takes its slice (None: no terms). ``call_kwargs`` go to every ``pipe(...)`` call."""
    terms = terms or ()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PPAPError(f"batch size must be >= 1, got {batch_size!r}")
    out = []
    with tqdm(total=num, desc=desc, unit="img", disable=not progress) as bar:  # closed before an error is reported
        for b0 in range(0, num, batch_size):
            n = min(batch_size, num - b0)
            index = slice(b0, b0 + n)
            cond = conditioning.select(index) if conditioning is not None else None
            cond_kwargs: dict[str, Any] = {} if cond is None else cond.as_kwargs()
            x = pipe(  # type: ignore[union-attr]  # return_dict=True: an ImagePipelineOutput
                batch_size=n,
                generator=sample_generators(seed, start + b0, n),
                terms=[t.select(index) for t in terms],
                output_type="latent",
                progress=False,
                **cond_kwargs,
                **call_kwargs,
            ).images
            out.append(x.clamp(-1, 1).cpu())
            bar.update(n)
    return torch.cat(out) if out else torch.empty((0,) + pipe.image_shape)


def generate_corpus(
    pipe: PPAPPipeline,
    root: str | os.PathLike,
    spec: CorpusSpec,
    *,
    conditioning: Conditioning | None = None,
    shards: list[int] | None = None,
    progress: bool = True,
) -> int:
    """Draw the shards of corpus ``spec`` that ``root`` still lacks with ``pipe`` (unguided): all
    of them, or those of ``shards`` (the share that a caller handing out the work chose, e.g. one
    process's share of the list that one process made). Returns how many shards this call wrote.
    The caller opens the corpus (``open_corpus``) once, on one process, before; then this only
    reads what is left (a folder without a manifest is opened here). Sample k of the corpus is
    ``sample_images``' sample k of ``spec.seed``, whichever shard, process or run draws it."""
    root = Path(root)
    missing = pending_shards(root, spec) if (root / CORPUS_MANIFEST).exists() else open_corpus(root, spec)
    mine = missing if shards is None else [k for k in shards if k in missing]
    for k in tqdm(mine, desc="corpus", unit="shard", disable=not progress):
        start, n = k * spec.shard_size, spec.shard_count(k)
        cond = conditioning.select(slice(start, start + n)) if conditioning is not None else None
        x = sample_images(
            pipe,
            n,
            seed=spec.seed,
            start=start,
            batch_size=spec.batch_size,
            conditioning=cond,
            progress=False,
            num_inference_steps=spec.steps,
            eta=spec.eta,
            sampler=spec.sampler,
        )
        write_shard(root, k, to_hwc_uint8(x))
    return len(mine)
