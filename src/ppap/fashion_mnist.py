"""The real Fashion-MNIST: a reader of its IDX files (the labelled baselines, the evaluator, the zoo).

Images come back as float [N, 1, 32, 32] in [-1, 1], like every image in ppap.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .images import uint8_to_unit
from .io import PPAPError

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
