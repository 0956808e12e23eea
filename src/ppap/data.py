"""Datasets: the real Fashion-MNIST reader and the data-free corpus of generated images.

Images everywhere in ppap are float tensors in [-1, 1], shape [B, C, H, W]. Stored images are
uint8 [N, H, W, C] (the layout of every image file and of ``np.savez`` outputs).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .io import PPAPError, atomic_write_bytes, atomic_write_json, check_fields, exclusive_lock, read_json_object

FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
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
# Data-free corpus: shards of generated images + a manifest that records each shard's checksum.
# --------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = "ppap-corpus-v2"
_V1 = "ppap-corpus-v1"  # shards written atomically but not recorded; the next open_corpus records them

_COUNT = (int, lambda v: v >= 1, ">= 1")
_SPEC_FIELDS = {
    "model": (str,),
    "num_samples": _COUNT,
    "shard_size": _COUNT,
    "steps": _COUNT,
    "batch_size": _COUNT,
    "eta": (float, lambda v: math.isfinite(v) and v >= 0, "(finite, >= 0)"),
    "seed": (int,),
    "schedule": (dict,),
    "sampler": (str,),
    "condition": ((dict, type(None)),),
}
_MANIFEST_FIELDS = _SPEC_FIELDS | {
    "format": (str, lambda v: v in (FORMAT, _V1), f"'{FORMAT}'"),
    "shards": (dict, None, "", False),
}  # required from v2 on (checked below)
_RECORD_FIELDS = {
    "sha256": (str, lambda v: len(v) == 64, "of 64 hex digits"),
    "bytes": _COUNT,
    "dtype": (str,),
    "shape": (list, lambda v: len(v) == 4 and all(type(i) is int and i >= 0 for i in v), "of 4 sizes"),
}


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
    return Path(root) / f"shard-{k:05d}.npy"


def _name(k: int) -> str:  # a shard's key in the manifest's "shards"
    return f"{k:05d}"


def _locked(root: Path):
    """The folder's lock: opening a corpus and recording a shard are read-modify-writes of the
    manifest (and the opener deletes files), so they must not interleave."""
    if not root.is_dir():
        raise PPAPError(f"{root} is not a ppap corpus (no such folder); create one with `ppap generate`")
    return exclusive_lock(root / LOCK)


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.exists():
        raise PPAPError(f"{root} is not a ppap corpus (no {MANIFEST}); create one with `ppap generate`")
    meta = read_json_object(path, "corpus manifest", _MANIFEST_FIELDS)
    if meta["format"] == FORMAT:
        check_fields(meta, f"corpus manifest {path}", {"shards": (dict,)})
    for name, record in meta.get("shards", {}).items():
        check_fields(record, f"corpus manifest {path}, record of shard {name}", _RECORD_FIELDS)
    return meta


def _same_corpus(root: Path, meta: dict, spec: CorpusSpec) -> None:
    for key, new in spec.__dict__.items():
        if meta[key] != new:
            raise PPAPError(
                f"{root} holds a different corpus ({key}: {meta[key]!r} there, {new!r} asked); "
                "use another --out or the same settings to resume"
            )


def _record(data: bytes, shape) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "shape": list(shape), "dtype": "uint8"}


def _read_shard(path: Path, record: dict | None, count: int, hwc: list | None) -> tuple[np.ndarray | None, str | None]:
    """``(images, None)`` if ``path`` is the file its manifest ``record`` describes (size, sha256)
    and a shard of ``count`` uint8 images of size ``hwc`` (None: any); else ``(None, why not)``."""
    if not path.is_file():
        return None, "missing"
    if record is None:
        return None, "not recorded in the manifest (a foreign file, or a crash before its record)"
    data = path.read_bytes()
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        return None, "damaged (checksum mismatch)"
    try:  # the checksum matches, so these can only fail for a record someone wrote by hand
        arr = np.load(BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None, "not a readable .npy file"
    if arr.dtype != np.uint8 or arr.ndim != 4:
        return None, f"not uint8 [n, H, W, C] images (it is {arr.dtype} {list(arr.shape)})"
    if len(arr) != count:
        return None, f"a shard of {len(arr)} images where the corpus needs {count}"
    if hwc is not None and list(arr.shape[1:]) != hwc:
        return None, f"a shard of {list(arr.shape[1:])} images (H, W, C) where the others have {hwc}"
    return arr, None


def open_corpus(root: str | os.PathLike, spec: CorpusSpec) -> list[int]:
    """Create or reopen corpus ``root`` for ``spec``; return the shard indices still to draw.

    A shard is present only if its file is what ``write_shard`` recorded in the manifest (size and
    sha256) and a well-formed shard. Every other shard file -- truncated, altered, foreign, or left
    by a crash between file and record -- is deleted and its shard returned, so it is drawn again,
    never adopted. The opener also deletes the temp files (``.*.tmp``) of killed writers: call it
    once, on one process, before any shard is drawn (the drawing ranks of ``generate_corpus`` only
    read). It all runs under the folder's lock, which ``write_shard`` holds for its whole write, so
    it never sees a write half-way, and of two openers with different specs exactly one wins.
    """
    root = Path(root)
    check_fields(
        spec.__dict__, "corpus spec", _SPEC_FIELDS
    )  # before the folder exists: a bad spec leaves no trace, and the fixed command runs
    if root.exists() and not root.is_dir():
        raise PPAPError(f"corpus folder {root} is a file")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        path = root / MANIFEST
        meta = _read_manifest(root) if path.exists() else dict(spec.__dict__, format=FORMAT, shards={})
        before = json.dumps(meta, sort_keys=True) if path.exists() else None
        _same_corpus(root, meta, spec)
        if meta["format"] == _V1:  # v1 wrote shards atomically: take each file's checksum now, then check it as any
            meta["shards"] = {
                _name(k): _record(p.read_bytes(), [0] * 4) for k in range(spec.num_shards) if (p := shard_path(root, k)).is_file()
            }
            meta["format"] = FORMAT
        for tmp in root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        keep, missing, hwc = {}, [], None
        for k in range(spec.num_shards):
            record = meta["shards"].get(_name(k))
            arr, why = _read_shard(shard_path(root, k), record, spec.shard_count(k), hwc)
            if why is None:
                hwc = hwc or list(arr.shape[1:])
                keep[_name(k)] = dict(record, shape=list(arr.shape), dtype=str(arr.dtype))
            else:
                missing.append(k)
                shard_path(root, k).unlink(missing_ok=True)
        names = {shard_path(root, k).name for k in range(spec.num_shards)}
        for extra in root.glob("shard-*.npy"):  # not one of this corpus' shards: foreign
            if extra.name not in names:
                extra.unlink()
        meta["shards"] = keep
        if json.dumps(meta, sort_keys=True) != before:
            atomic_write_json(path, meta)
    return missing


def write_shard(root: Path, k: int, images: Tensor | np.ndarray) -> None:
    """Write shard k (``images`` uint8 [n, H, W, C], n as the corpus' spec says) and record its
    checksum in the manifest, holding the folder's lock for both. The file goes first: a crash
    in between leaves an unrecorded file, which the next ``open_corpus`` deletes and redraws."""
    arr = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) == 0:
        raise ValueError(f"a shard is uint8 [n >= 1, H, W, C], got {arr.dtype} {arr.shape}")
    buf = BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data, root = buf.getvalue(), Path(root)
    with _locked(root):
        meta = _read_manifest(root)
        spec = CorpusSpec(**{key: meta[key] for key in _SPEC_FIELDS})
        if meta["format"] != FORMAT or not 0 <= k < spec.num_shards or len(arr) != spec.shard_count(k):
            raise ValueError(f"shard {k} of {root} must hold {spec.shard_count(k)} images of an opened corpus, got {len(arr)}")
        if any(r["shape"][1:] != list(arr.shape[1:]) for name, r in meta["shards"].items() if name != _name(k)):
            raise ValueError(f"shard {k} of {root} has images of {list(arr.shape[1:])} (H, W, C), unlike the other shards")
        atomic_write_bytes(shard_path(root, k), data)
        meta["shards"][_name(k)] = _record(data, arr.shape)
        atomic_write_json(root / MANIFEST, meta)


def reuse_shards(root: str | os.PathLike, spec: CorpusSpec, source: str | os.PathLike) -> int:
    """Copy into corpus ``root`` (opened for ``spec``) the shards that the finished corpus
    ``source`` already holds: sample k depends only on the seed and k, so a corpus with the same
    settings but another size has the same shards wherever a shard is whole in both. A larger
    corpus then draws only its new samples. Each copied shard is checked against ``source``'s
    manifest first (a damaged one is left to draw). Returns how many shards were copied."""
    root, source = Path(root), Path(source)
    theirs = _read_manifest(source)
    if theirs["format"] != FORMAT:
        raise PPAPError(f"corpus {source} has no shard checksums ({theirs['format']}); re-run `ppap generate` on it once")
    other = CorpusSpec(**{key: theirs[key] for key in _SPEC_FIELDS})
    for key, want in spec.__dict__.items():
        if key != "num_samples" and theirs[key] != want:  # other settings: other samples
            values = f"{theirs[key]!r} there, {want!r} here"
            detail = values if len(values) <= 120 else "differs"  # a conditional corpus's labels are long
            raise PPAPError(f"corpus {source} was drawn with other settings ({key}: {detail}); nothing reused")
    copied = 0
    for k in pending_shards(root, spec):
        if k >= other.num_shards or other.shard_count(k) != spec.shard_size or spec.shard_count(k) != spec.shard_size:
            continue  # a partial shard in either holds other samples
        arr, why = _read_shard(shard_path(source, k), theirs["shards"].get(_name(k)), spec.shard_size, None)
        if why is None:
            write_shard(root, k, arr)
            copied += 1
    return copied


def pending_shards(root: str | os.PathLike, spec: CorpusSpec) -> list[int]:
    """The shards of opened corpus ``root`` still to draw: a cheap check (file, record, size) that
    deletes nothing, so that drawing processes never touch each other's work."""
    root = Path(root)
    meta = _read_manifest(root)
    _same_corpus(root, meta, spec)
    records = meta.get("shards", {})
    return [
        k
        for k in range(spec.num_shards)
        if not ((r := records.get(_name(k))) and (p := shard_path(root, k)).is_file() and p.stat().st_size == r["bytes"])
    ]


def _checked_shards(root: Path, meta: dict, spec: CorpusSpec):
    """Corpus ``root``'s shards in order (uint8 [n, H, W, C] each), every one checked against its
    manifest record (sha256) and for shape: a missing or damaged shard is a PPAPError."""
    hwc = None
    for k in range(spec.num_shards):
        path = shard_path(root, k)
        arr, why = _read_shard(path, meta["shards"].get(_name(k)), spec.shard_count(k), hwc)
        if why == "missing":
            raise PPAPError(
                f"corpus {root} is incomplete: shard {path.name} of {spec.num_shards} is missing; "
                "re-run `ppap generate` with the same settings to finish it"
            )
        if why is not None:
            raise PPAPError(f"corpus shard {path} is {why}; re-run `ppap generate` with the same settings to re-draw it")
        hwc = hwc or list(arr.shape[1:])
        yield arr


def check_corpus(root: str | os.PathLike, spec: CorpusSpec) -> None:
    """A PPAPError unless ``root`` holds the whole corpus ``spec``, each shard as its manifest
    records it: what a drawing run checks before it reports success."""
    root = Path(root)
    meta = _read_manifest(root)
    _same_corpus(root, meta, spec)
    for _ in _checked_shards(root, meta, spec):
        pass


def load_corpus(root: str | os.PathLike, limit: int | None = None) -> Tensor:
    """The images of a finished corpus (the first ``limit``) as float [N, C, H, W] in [-1, 1].

    Every shard is checked against its manifest record (sha256) and for shape, also those past
    ``limit``: a corpus is used whole or not at all. Takes no lock (the corpus may be read-only)."""
    root = Path(root)
    meta = _read_manifest(root)
    if meta["format"] == _V1:
        raise PPAPError(f"corpus {root} has no shard checksums ({_V1}); re-run `ppap generate` with the same settings once to add them")
    spec = CorpusSpec(**{key: meta[key] for key in _SPEC_FIELDS})
    arrays, n = [], 0
    for arr in _checked_shards(root, meta, spec):
        if limit is None or n < limit:
            arrays.append(arr)
            n += len(arr)
    x = torch.from_numpy(np.concatenate(arrays)[:limit]).permute(0, 3, 1, 2)
    return uint8_to_unit(x)


class InfiniteBatches:
    """Deterministic, resumable minibatches over a fixed tensor set.

    Batch ``step`` is a pure function of ``(seed, step)``: sample k of the flat stream is element
    ``perm_e[k mod N]`` of epoch ``e = k // N``'s permutation. A resumed run therefore sees
    exactly the batches it would have seen, with none lost or repeated. With ``weights`` [N], an
    epoch is N draws with replacement in proportion to them (a re-weighted corpus), equally seeded.
    """

    def __init__(self, *tensors: Tensor, batch_size: int, seed: int, weights: Tensor | None = None):
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("all tensors need the same first dimension")
        if n == 0:
            raise PPAPError("cannot draw batches from an empty dataset")
        if weights is not None and (weights.shape != (n,) or not bool((weights >= 0).all()) or float(weights.sum()) <= 0):
            raise ValueError(f"weights must be [{n}], non-negative and not all zero")
        self.tensors, self.batch_size, self.seed, self.n, self.weights = tensors, batch_size, seed, n, weights
        self._perm_cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm_cache[epoch] = (
                torch.randperm(self.n, generator=g)
                if self.weights is None
                else torch.multinomial(self.weights.double().cpu(), self.n, replacement=True, generator=g)
            )
        return self._perm_cache[epoch]

    def indices(self, step: int) -> Tensor:
        k = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, pos = k // self.n, k % self.n
        return (
            torch.stack([self._perm(int(e))[int(p)] for e, p in zip(epochs, pos)])
            if epochs[0] != epochs[-1]
            else self._perm(int(epochs[0]))[pos]
        )

    def batch(self, step: int) -> tuple[Tensor, ...]:
        idx = self.indices(step)
        return tuple(t[idx] for t in self.tensors)


# --------------------------------------------------------------------------------------------
# Drawing a corpus from a diffusion model
# --------------------------------------------------------------------------------------------


def corpus_spec(
    pipe,
    ref: str,
    num: int,
    *,
    shard_size: int = 256,
    steps: int = 25,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    sampler: str = "ddim",
    conditioning=None,
) -> CorpusSpec:
    """The identity of a corpus of ``num`` samples of ``pipe`` (a ``PPAPPipeline``); a conditional
    model's ``conditioning`` (for all ``num`` samples) is part of it."""
    from .io import fingerprint

    for name, value in (("corpus size", num), ("shard size", shard_size), ("batch size", batch_size), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PPAPError(f"{name} must be >= 1, got {value!r}")
    schedule = pipe.diffusion.schedule
    condition = None
    if conditioning is not None:
        condition = {
            "class_labels": None if conditioning.class_labels is None else conditioning.class_labels.tolist(),
            "prompt_embeds": None
            if conditioning.prompt_embeds is None
            else fingerprint(
                {
                    "p": conditioning.prompt_embeds,
                    **({} if conditioning.negative_prompt_embeds is None else {"n": conditioning.negative_prompt_embeds}),
                }
            )[:16],
            "guidance_scale": conditioning.guidance_scale,
        }
    spec = CorpusSpec(
        model=f"{ref}@{fingerprint(pipe.unet.state_dict())[:16]}",
        num_samples=num,
        shard_size=shard_size,
        steps=steps,
        eta=eta,
        seed=seed,
        batch_size=batch_size,
        sampler=sampler,
        condition=condition,
        schedule={
            "num_train_timesteps": schedule.num_train_timesteps,
            "beta_schedule": schedule.config.get("beta_schedule"),
            "prediction_type": schedule.prediction_type,
        },
    )
    check_fields(spec.__dict__, "corpus spec", _SPEC_FIELDS)  # open_corpus' rules: a spec from here always opens
    return spec


def generate_corpus(
    pipe,
    root,
    spec: CorpusSpec,
    *,
    conditioning=None,
    shards: list[int] | None = None,
    progress: bool = True,
) -> int:
    """Draw the shards of corpus ``spec`` that ``root`` still lacks with ``pipe`` (unguided): all
    of them, or those of ``shards`` (the share that a caller handing out the work chose, e.g. one
    process's share of the list that one process made). Returns how many shards this call wrote.
    The caller opens the corpus (``open_corpus``) once, on one process, before; then this only
    reads what is left (a folder without a manifest is opened here)."""
    from tqdm.auto import tqdm

    from .batch_sampling import sample_images
    from .images import to_hwc_uint8

    root = Path(root)
    missing = pending_shards(root, spec) if (root / MANIFEST).exists() else open_corpus(root, spec)
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
