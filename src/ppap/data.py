"""Datasets: the real Fashion-MNIST reader and the data-free corpus of generated images.

Images everywhere in ppap are float tensors in [-1, 1], shape [B, C, H, W]. Stored images are
uint8 [N, H, W, C] (the layout of every image file and of ``np.savez`` outputs).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .io import PPAPError, atomic_write_bytes, atomic_write_json

FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where the IDX files live: ``data_dir``, else ``$PPAP_DATA_DIR``, else Debian's path."""
    return Path(data_dir or os.environ.get("PPAP_DATA_DIR") or DEFAULT_FASHION_DIR)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08 = unsigned byte, the only type Fashion-MNIST uses
        raise PPAPError(f"{path} is not a uint8 IDX file (header {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise PPAPError(f"{path} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as ``(images [N, 1, 32, 32] float in [-1, 1], labels [N] int64)``.

    The 28x28 images are zero-padded (background is 0 = -1 after scaling) to 32x32 so that
    UNets can halve the resolution three times.
    """
    if split not in ("train", "test"):
        raise PPAPError(f"unknown Fashion-MNIST split {split!r}; valid: 'train', 'test'")
    root = fashion_mnist_dir(data_dir)
    paths = {kind: root / _FILES[(split, kind)] for kind in ("images", "labels")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise PPAPError(
            f"Fashion-MNIST not found ({missing[0]}): run `sudo apt-get install dataset-fashion-mnist`, "
            "or point --data-dir / PPAP_DATA_DIR at a folder with the four *-ubyte.gz files"
        )
    images = _read_idx(paths["images"])
    labels = _read_idx(paths["labels"])
    if images.shape[0] != labels.shape[0]:
        raise PPAPError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    x = torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2)))).unsqueeze(1)
    return uint8_to_unit(x), torch.from_numpy(labels.astype(np.int64))


def uint8_to_unit(x: Tensor) -> Tensor:
    """uint8 [.., 0, 255] -> float32 [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


def unit_to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to nearest."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Data-free corpus: shards of generated images + a manifest.
# --------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CorpusSpec:
    """What a corpus is: identical specs resume the same corpus; a different one is an error."""

    model: str  # identity of the diffusion model (path or zoo name + weights hash)
    num_samples: int  # total images
    shard_size: int  # images per shard file; the last shard may be smaller
    steps: int  # DDIM steps used to draw them
    eta: float  # DDIM eta
    seed: int  # sample k's noise depends only on (seed, k): resumption does not depend on rank or history
    schedule: dict  # num_train_timesteps, beta schedule etc., for the record
    batch_size: int = 64  # sampling batch: conv kernels round differently per batch size, so it is part of the identity
    sampler: str = "ddim"  # "ddim" or "ddpm"
    condition: dict | None = None  # a conditional model's conditions (class labels cycled, prompt embeddings' hash, CFG scale)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_count(self, k: int) -> int:
        return min(self.shard_size, self.num_samples - k * self.shard_size)


def shard_path(root: Path, k: int) -> Path:
    return root / f"shard-{k:05d}.npy"


def open_corpus(root: str | os.PathLike, spec: CorpusSpec) -> list[int]:
    """Create or reopen corpus ``root`` for ``spec``; return the shard indices still missing.

    A half-written shard cannot exist (shards are written atomically), so "missing" is exact.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / MANIFEST
    want = spec.__dict__ | {"format": "ppap-corpus-v1"}
    if manifest.exists():
        have = json.loads(manifest.read_text())
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            key, (old, new) = next(iter(diff.items()))
            raise PPAPError(
                f"{root} holds a different corpus ({key}: {old!r} there, {new!r} asked); "
                "use another --out or the same settings to resume"
            )
    else:
        atomic_write_json(manifest, want)
    return [k for k in range(spec.num_shards) if not shard_path(root, k).exists()]


def write_shard(root: Path, k: int, images: Tensor) -> None:
    """Atomically write shard k: ``images`` uint8 [n, H, W, C]."""
    arr = images.cpu().numpy()
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"a shard is uint8 [n, H, W, C], got {arr.dtype} {arr.shape}")
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(shard_path(root, k), buf.getvalue())


def load_corpus(root: str | os.PathLike, limit: int | None = None) -> Tensor:
    """All images of a finished corpus as float [N, C, H, W] in [-1, 1]."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.exists():
        raise PPAPError(f"{root} is not a ppap corpus (no {MANIFEST}); create one with `ppap generate`")
    meta = json.loads(manifest.read_text())
    n_shards = -(-meta["num_samples"] // meta["shard_size"])
    missing = [k for k in range(n_shards) if not shard_path(root, k).exists()]
    if missing:
        raise PPAPError(f"corpus {root} is incomplete: shard {missing[0]} of {n_shards} missing; re-run `ppap generate` to finish it")
    arrays = []
    for k in range(n_shards):
        try:
            arrays.append(np.load(shard_path(root, k), allow_pickle=False))
        except Exception as e:  # a damaged file must not surface as a numpy traceback
            raise PPAPError(f"corpus shard {shard_path(root, k)} is corrupt ({e})") from None
        if limit is not None and sum(len(a) for a in arrays) >= limit:
            break
    x = torch.from_numpy(np.concatenate(arrays)[:limit]).permute(0, 3, 1, 2)
    return uint8_to_unit(x)


class InfiniteBatches:
    """Deterministic, resumable minibatches over a fixed tensor set.

    Batch ``step`` is a pure function of ``(seed, step)``: sample k of the flat stream is element
    ``perm_e[k mod N]`` of epoch ``e = k // N``'s permutation. A resumed run therefore sees
    exactly the batches it would have seen, with none lost or repeated.
    """

    def __init__(self, *tensors: Tensor, batch_size: int, seed: int):
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("all tensors need the same first dimension")
        if n == 0:
            raise PPAPError("cannot draw batches from an empty dataset")
        self.tensors, self.batch_size, self.seed, self.n = tensors, batch_size, seed, n
        self._perm_cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm_cache[epoch] = torch.randperm(self.n, generator=g)
        return self._perm_cache[epoch]

    def indices(self, step: int) -> Tensor:
        k = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, pos = k // self.n, k % self.n
        return torch.stack([self._perm(int(e))[int(p)] for e, p in zip(epochs, pos)]) if epochs[0] != epochs[-1] \
            else self._perm(int(epochs[0]))[pos]

    def batch(self, step: int) -> tuple[Tensor, ...]:
        idx = self.indices(step)
        return tuple(t[idx] for t in self.tensors)


# --------------------------------------------------------------------------------------------
# Drawing a corpus from a diffusion model
# --------------------------------------------------------------------------------------------


def corpus_spec(pipe, ref: str, num: int, *, shard_size: int = 256, steps: int = 25, eta: float = 0.0, seed: int = 0,
                batch_size: int = 64, sampler: str = "ddim", conditioning=None) -> CorpusSpec:
    """The identity of a corpus of ``num`` samples of ``pipe`` (a ``PPAPPipeline``); a conditional
    model's ``conditioning`` (for all ``num`` samples) is part of it."""
    from .io import fingerprint

    for name, value in (("corpus size", num), ("shard size", shard_size), ("batch size", batch_size), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise PPAPError(f"{name} must be >= 1, got {value!r}")
    schedule = pipe.diffusion.schedule
    condition = None
    if conditioning is not None:
        condition = {"class_labels": None if conditioning.class_labels is None else conditioning.class_labels.tolist(),
                     "prompt_embeds": None if conditioning.prompt_embeds is None else
                     fingerprint({"p": conditioning.prompt_embeds, **({} if conditioning.negative_prompt_embeds is None
                                                                       else {"n": conditioning.negative_prompt_embeds})})[:16],
                     "guidance_scale": conditioning.guidance_scale}
    return CorpusSpec(model=f"{ref}@{fingerprint(pipe.unet.state_dict())[:16]}", num_samples=num, shard_size=shard_size,
                      steps=steps, eta=eta, seed=seed, batch_size=batch_size, sampler=sampler, condition=condition,
                      schedule={"num_train_timesteps": schedule.num_train_timesteps, "beta_schedule": schedule.config.get("beta_schedule"),
                                "prediction_type": schedule.prediction_type})


def generate_corpus(pipe, root, spec: CorpusSpec, *, conditioning=None, rank: int = 0, world: int = 1,
                    shards: list[int] | None = None, progress: bool = True) -> int:
    """Draw the shards of corpus ``spec`` that ``root`` still lacks with ``pipe`` (unguided); with
    ``world`` processes, rank r takes every world-th missing shard (or exactly ``shards``, as a
    caller that hands them out chose). Returns how many shards this call wrote. The caller opens
    the corpus (``open_corpus``) once, on one process, before."""
    from tqdm.auto import tqdm

    from .images import to_hwc_uint8
    from .pipeline import generate

    missing = open_corpus(root, spec)
    mine = missing[rank::world] if shards is None else [k for k in shards if k in missing]
    for k in tqdm(mine, desc="corpus" if world == 1 else f"corpus (rank {rank})", unit="shard", disable=not progress):
        start, n = k * spec.shard_size, spec.shard_count(k)
        cond = conditioning.select(slice(start, start + n)) if conditioning is not None else None
        x = generate(pipe, n, seed=spec.seed, start=start, batch_size=spec.batch_size, conditioning=cond, progress=False,
                     num_inference_steps=spec.steps, eta=spec.eta, sampler=spec.sampler)
        write_shard(Path(root), k, torch.from_numpy(to_hwc_uint8(x)))
    return len(mine)
