"""Files: atomic writes, safetensors weights with clear errors, and ``module:function`` factories.

Nothing here unpickles user files: weights are safetensors; private resume checkpoints (which
ppap itself wrote) are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import PPAPError


def _umask_by_setting() -> int:
    umask = os.umask(0)  # os.umask reads the mask only by replacing it: done once, at import
    os.umask(umask)
    return umask


_UMASK_AT_IMPORT = _umask_by_setting()


def current_umask() -> int:
    """The process umask, read without changing it: from ``/proc/self/status`` (Linux), else
    the value it had when ppap was imported. Setting it to read it back (``os.umask``) would
    race with files other threads create meanwhile."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def give_usual_permissions(path: Path, written_since: float | None = None) -> None:
    """Set ``path``'s mode to what ``open()`` would have given it (0666 less the umask): writers
    that go through a private temporary file leave 0600, which other users cannot read. A folder:
    the ``*.safetensors`` under it written at or after ``written_since`` (``time.time()`` before a
    ``save_pretrained``), so that a user's other files there keep their modes."""
    umask = current_umask()
    path = Path(path)
    files = [path] if not path.is_dir() else [f for f in sorted(path.rglob("*.safetensors")) if f.stat().st_mtime >= (written_since or 0.0)]
    for file in files:
        os.chmod(file, 0o666 & ~umask)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        give_usual_permissions(Path(tmp))  # mkstemp (and safetensors' save_file) make 0600
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def exclusive_lock(path: str | os.PathLike, blocking: bool = True):
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for the ``with`` block; the OS
    drops it when the process dies, so a killed holder never leaves a stale lock behind. Not
    ``blocking``: a held lock is a one-line PPAPError instead of a wait."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise PPAPError(f"{Path(path).parent} is in use by another ppap process (lock {path} held)") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic(Path(path), lambda p: p.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """For ppap's own resume checkpoints (tensors, numbers, lists, dicts only)."""
    _atomic(Path(path), lambda p: torch.save(obj, p))


def load_resume_state(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PPAPError(f"resume checkpoint {path} is unreadable ({type(e).__name__}); delete it to start over") from None


def _parse_json(path: Path, what: str) -> Any:
    if not path.exists():
        raise PPAPError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise PPAPError(f"{what} {path} is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise PPAPError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except OSError as e:
        raise PPAPError(f"cannot read {what} {path} ({e.strerror or e})") from None


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    return _parse_json(Path(path), what)


class Field(NamedTuple):
    """One key of a JSON object, for ``check_fields`` / ``read_json_object``.

    ``check`` gets the (type-checked) value and returns whether it is acceptable; ``need`` says
    what it demands, for the message (">= 1"). A plain tuple ``(types, check, need, required)``
    works as well. ``float`` in ``types`` admits integers too (JSON has one number type);
    ``int`` never admits ``true``/``false``.
    """

    types: type | tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    need: str = ""
    required: bool = True


_JSON_KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "true/false",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def _json_kind(value: Any) -> str:
    return next((name for t, name in _JSON_KINDS.items() if isinstance(value, t)), type(value).__name__)


def check_fields(obj: Any, where: str, schema: Mapping[str, Field | tuple]) -> dict:
    """``obj`` if it is a dict whose keys satisfy ``schema`` (key -> ``Field``); otherwise a
    one-line PPAPError naming ``where`` and the first bad field. Keys not in ``schema`` pass."""
    if not isinstance(obj, dict):
        raise PPAPError(f"{where} is not a JSON object (it is {_json_kind(obj)})")
    for key, field in schema.items():
        field = Field(*field)
        types = field.types if isinstance(field.types, tuple) else (field.types,)
        if key not in obj:
            if field.required:
                raise PPAPError(f"{where} lacks field {key!r}")
            continue
        value = obj[key]
        ok = (isinstance(value, types) or (float in types and isinstance(value, int))) and (not isinstance(value, bool) or bool in types)
        try:
            ok = ok and (field.check is None or bool(field.check(value)))
        except (TypeError, ValueError, KeyError, IndexError):  # a check of a malformed nested value
            ok = False
        if not ok:
            try:
                shown = repr(value) if isinstance(value, float) else json.dumps(value)  # repr: nan, inf as Python says them
            except (TypeError, ValueError):  # not a JSON value (a caller-built dict)
                shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            want = " or ".join(_JSON_KINDS.get(t, t.__name__) for t in types) + (f" {field.need}" if field.need else "")
            raise PPAPError(f"{where}: field {key!r} must be {want}, got {shown}")
    return obj


def read_json_object(path: str | os.PathLike, what: str, schema: Mapping[str, Field | tuple]) -> dict:
    """Read JSON file ``path`` (a ``what``: "corpus manifest") that must be an object matching
    ``schema``; a missing, unreadable, non-JSON, binary or mis-shaped file is one PPAPError line
    naming the file and, where it is one field, that field."""
    path = Path(path)
    return check_fields(_parse_json(path, what), f"{what} {path}", schema)


def check_same_settings(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    what: str,
    remedy: str,
    *,
    keys: Iterable[str] | None = None,
    ignore: Iterable[str] = (),
) -> None:
    """Refuse to go on with a run (a corpus, an expert folder, a bench, a training recipe) whose
    settings as ``stored`` (read back from its JSON) differ from the ``current`` ones: one
    PPAPError line "``what`` (FIELDS); ``remedy``". FIELDS names the differing fields, with both
    values where one field differs and they are short ("seed: 0 there, 1 here").

    The fields compared are ``keys`` (default: every key of either), less ``ignore``; a key one
    side lacks reads as null. Both sides are compared as JSON stores them (tuples as lists, 8
    equal to 8.0)."""
    skip = set(ignore)
    names = [k for k in (keys if keys is not None else dict.fromkeys([*current, *stored])) if k not in skip]
    old, now = (json.loads(json.dumps({k: side.get(k) for k in names})) for side in (stored, current))
    differ = [k for k in names if old[k] != now[k]]
    if not differ:
        return
    values = f"{differ[0]}: {old[differ[0]]!r} there, {now[differ[0]]!r} here"
    fields = values if len(differ) == 1 and len(values) <= 120 else f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''}"
    raise PPAPError(f"{what} ({fields}); {remedy}")


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a safetensors file, turning a missing or corrupt file into a one-line PPAPError."""
    path = Path(path)
    if not path.exists():
        raise PPAPError(f"weights file not found: {path}")
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
        raise PPAPError(f"{path}: ppap loads weights only from .safetensors files (pickle formats can run code)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PPAPError(f"weights file {path} is corrupt or not safetensors ({str(e).splitlines()[0]})") from None


def load_weights_into(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Strictly load a safetensors state dict into ``module`` (every key, every shape)."""
    state = load_safetensors(path)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PPAPError(f"weights {path} do not fit the model ({detail})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise PPAPError(f"weights {path} do not fit the model: {k} has shape {tuple(v.shape)}, model wants {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=True)
    return module


def resolve_factory(ref: str) -> Callable[..., nn.Module]:
    """``'package.module:function'`` -> the callable, with a one-line error if it is not there."""
    if ":" not in ref:
        raise PPAPError(f"model factory {ref!r} must look like 'package.module:function'")
    mod_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise PPAPError(f"cannot import {mod_name!r} for factory {ref!r} ({e})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise PPAPError(f"{mod_name!r} has no attribute {attr!r} (factory {ref!r})")
    if not callable(fn):
        raise PPAPError(f"factory {ref!r} is not callable")
    return fn


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(state: dict[str, Tensor], dtype: torch.dtype | None = None) -> str:
    """sha256 of a state dict's names, shapes, dtypes and values: a weights identity that does
    not depend on file names or formats. With ``dtype``, floating-point tensors are hashed as
    their values rounded to it, so copies of one model in several precisions agree at that
    precision; ``dtype=torch.float32`` leaves the fingerprint of float32 weights as it is."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        v = state[key].detach().cpu()
        v = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        h.update(f"{key}:{tuple(v.shape)}:{v.dtype};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
