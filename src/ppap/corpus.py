"""The data-free corpus store: a folder of shards of generated images and a manifest that records
each shard's checksum, so that a corpus resumes after a crash, is shared out among processes, and
is used whole or not at all.

Shards hold uint8 [n, H, W, C] images (``.npy``); ``load_corpus`` gives float [N, C, H, W] in
[-1, 1]. Drawing the images is the pipeline's business (``ppap.pipeline.generate_corpus``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .images import uint8_to_unit
from .io import (
    PPAPError,
    atomic_write_bytes,
    atomic_write_json,
    check_fields,
    check_same_settings,
    exclusive_lock,
    fingerprint,
    read_json_object,
)

CORPUS_MANIFEST = "manifest.json"
CORPUS_LOCK = ".lock"
CORPUS_FORMAT = "ppap-corpus-v2"
_CORPUS_FORMAT_V1 = "ppap-corpus-v1"  # shards written atomically but not recorded; the next open_corpus records them

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
    "format": (str, lambda v: v in (CORPUS_FORMAT, _CORPUS_FORMAT_V1), f"'{CORPUS_FORMAT}'"),
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
    return exclusive_lock(root / CORPUS_LOCK)


def _read_manifest(root: Path) -> dict:
    path = root / CORPUS_MANIFEST
    if not path.exists():
        raise PPAPError(f"{root} is not a ppap corpus (no {CORPUS_MANIFEST}); create one with `ppap generate`")
    meta = read_json_object(path, "corpus manifest", _MANIFEST_FIELDS)
    if meta["format"] == CORPUS_FORMAT:
        check_fields(meta, f"corpus manifest {path}", {"shards": (dict,)})
    for name, record in meta.get("shards", {}).items():
        check_fields(record, f"corpus manifest {path}, record of shard {name}", _RECORD_FIELDS)
    return meta


def _same_corpus(root: Path, meta: dict, spec: CorpusSpec) -> None:
    check_same_settings(
        meta, spec.__dict__, f"{root} holds a different corpus", "use another --out or the same settings to resume", keys=_SPEC_FIELDS
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
        path = root / CORPUS_MANIFEST
        meta = _read_manifest(root) if path.exists() else dict(spec.__dict__, format=CORPUS_FORMAT, shards={})
        before = json.dumps(meta, sort_keys=True) if path.exists() else None
        _same_corpus(root, meta, spec)
        if meta["format"] == _CORPUS_FORMAT_V1:  # v1 wrote shards atomically: take each file's checksum now, then check it as any
            meta["shards"] = {
                _name(k): _record(p.read_bytes(), [0] * 4) for k in range(spec.num_shards) if (p := shard_path(root, k)).is_file()
            }
            meta["format"] = CORPUS_FORMAT
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
        if meta["format"] != CORPUS_FORMAT or not 0 <= k < spec.num_shards or len(arr) != spec.shard_count(k):
            raise ValueError(f"shard {k} of {root} must hold {spec.shard_count(k)} images of an opened corpus, got {len(arr)}")
        if any(r["shape"][1:] != list(arr.shape[1:]) for name, r in meta["shards"].items() if name != _name(k)):
            raise ValueError(f"shard {k} of {root} has images of {list(arr.shape[1:])} (H, W, C), unlike the other shards")
        atomic_write_bytes(shard_path(root, k), data)
        meta["shards"][_name(k)] = _record(data, arr.shape)
        atomic_write_json(root / CORPUS_MANIFEST, meta)


def reuse_shards(root: str | os.PathLike, spec: CorpusSpec, source: str | os.PathLike) -> int:
    """Copy into corpus ``root`` (opened for ``spec``) the shards that the finished corpus
    ``source`` already holds: sample k depends only on the seed and k, so a corpus with the same
    settings but another size has the same shards wherever a shard is whole in both. A larger
    corpus then draws only its new samples. Each copied shard is checked against ``source``'s
    manifest first (a damaged one is left to draw). Returns how many shards were copied."""
    root, source = Path(root), Path(source)
    theirs = _read_manifest(source)
    if theirs["format"] != CORPUS_FORMAT:
        raise PPAPError(f"corpus {source} has no shard checksums ({theirs['format']}); re-run `ppap generate` on it once")
    other = CorpusSpec(**{key: theirs[key] for key in _SPEC_FIELDS})
    check_same_settings(  # other settings: other samples
        theirs, spec.__dict__, f"corpus {source} was drawn with other settings", "nothing reused", keys=_SPEC_FIELDS, ignore=["num_samples"]
    )
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
    if meta["format"] == _CORPUS_FORMAT_V1:
        raise PPAPError(
            f"corpus {root} has no shard checksums ({_CORPUS_FORMAT_V1}); re-run `ppap generate` with the same settings once to add them"
        )
    spec = CorpusSpec(**{key: meta[key] for key in _SPEC_FIELDS})
    arrays, n = [], 0
    for arr in _checked_shards(root, meta, spec):
        if limit is None or n < limit:
            arrays.append(arr)
            n += len(arr)
    x = torch.from_numpy(np.concatenate(arrays)[:limit]).permute(0, 3, 1, 2)
    return uint8_to_unit(x)


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
    prompts=None,
) -> CorpusSpec:
    """The identity of a corpus of ``num`` samples of ``pipe`` (a ``PPAPPipeline``); a conditional
    model's ``conditioning`` (for all ``num`` samples) is part of it, and the ``prompts`` (cycled
    over the samples) that its embeddings encode, for the record."""
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
        } | ({} if prompts is None else {"prompts": list(prompts)})
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
