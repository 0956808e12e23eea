import gzip
import struct

import numpy as np
import pytest
import torch

from ppap import PPAPError
from ppap.fashion_mnist import fashion_mnist_dir, load_fashion_mnist

needs_data = pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_data
def test_fashion_mnist_reader():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (10000,) and torch.equal(torch.bincount(y), torch.full((10,), 1000))
    assert x.min() == -1 and x.max() == 1
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # the 2-px padding is background


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_reader_with_data_dir_and_clear_errors(tmp_path, monkeypatch):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5))
    x, y = load_fashion_mnist("train", tmp_path)
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(imgs).float() / 127.5 - 1) and y.tolist() == [0, 1, 2, 3, 4]
    monkeypatch.setenv("PPAP_DATA_DIR", str(tmp_path))
    assert load_fashion_mnist("train")[0].shape == (5, 1, 32, 32)
    with pytest.raises(PPAPError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "empty")
    with pytest.raises(PPAPError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist("val", tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(4))
    with pytest.raises(PPAPError, match="5 images but 4 labels"):
        load_fashion_mnist("train", tmp_path)
