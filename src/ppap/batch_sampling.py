"""Many images, batch by batch, each seeded by its own index: sample k of a run seeded ``seed``
draws its noise from ``sample_seed(seed, k)`` alone, so that the batch size, the number of
processes and a resume point change no image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .diffusion import Conditioning
from .guidance import GuidanceTerm
from .io import PPAPError
from .pipeline import PPAPPipeline, sample_generators


def sample_images(
    pipe: PPAPPipeline,
    num: int,
    *,
    seed: int,
    batch_size: int = 64,
    start: int = 0,
    terms: Sequence[GuidanceTerm] = (),
    conditioning: Conditioning | None = None,
    progress: bool = True,
    desc: str = "sampling",
    **call_kwargs,
) -> Tensor:
    """``num`` images as float [N, C, H, W] in [-1, 1] (CPU), sample k seeded by ``sample_seed(seed,
    start + k)``. ``terms`` and ``conditioning`` hold per-sample targets / conditions for all
    ``num``; each batch takes its slice. ``call_kwargs`` go to every ``pipe(...)`` call."""
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
