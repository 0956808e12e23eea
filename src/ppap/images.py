"""Images in and out: the uint8 <-> [-1, 1] conversions, sample grids, PNGs, reference images
for dense targets, target maps.

In memory ppap images are float [B, C, H, W] in [-1, 1]; on disk they are uint8 [N, H, W, C].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .io import PPAPError

FITS = ("resize", "pad")


def uint8_to_unit(x: Tensor) -> Tensor:
    """uint8 [.., 0, 255] -> float32 [-1, 1]: 0 is -1, 255 is 1."""
    return x.float().div(127.5).sub(1.0)


def unit_to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped, rounding to nearest: the inverse of ``uint8_to_unit``."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def to_hwc_uint8(x: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    return unit_to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [H', W', C] grid, ``nrow`` images per row."""
    if nrow < 1:
        raise PPAPError(f"images per grid row must be >= 1, got {nrow}")
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[k]
    return grid


def fit_image(img, size: tuple[int, int], fit: str = "resize"):
    """A PIL image brought to ``size`` (H, W) by the documented rule:
    * ``resize``: bilinear (antialiased) resize to the model's size, aspect ratio not kept;
    * ``pad``: an image no larger than the model's size is centred on a black canvas (how the
      zoo's Fashion-MNIST models saw their 28x28 training images, padded to 32x32); a larger
      one is resized as above.
    """
    from PIL import Image

    if fit not in FITS:
        raise PPAPError(f"unknown reference fit {fit!r}; valid: {', '.join(FITS)}")
    h, w = size
    if (img.height, img.width) == (h, w):
        return img
    if fit == "pad" and img.height <= h and img.width <= w:
        canvas = Image.new(img.mode, (w, h), 0)
        canvas.paste(img, ((w - img.width) // 2, (h - img.height) // 2))
        return canvas
    return img.resize((w, h), Image.BILINEAR)


def load_reference_image(path: str | Path, image_shape: tuple[int, ...], fit: str = "resize") -> Tensor:
    """A PNG/JPEG reference as [1, C, H, W] in [-1, 1] at the diffusion model's shape: grey or RGB
    converted to the model's channels, the size brought to the model's by ``fit_image``."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise PPAPError(f"reference image not found: {path}")
    try:
        img = Image.open(path)
        img = img.convert("L" if image_shape[0] == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise PPAPError(f"cannot read reference image {path} ({type(e).__name__})") from None
    if image_shape[0] not in (1, 3):
        raise PPAPError(f"reference images are grey or RGB; this diffusion model has {image_shape[0]} channels")
    img = fit_image(img, tuple(image_shape[1:]), fit)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return uint8_to_unit(x[None])


def load_target_map(path: str | Path) -> Tensor:
    """A target map from ``.npy`` (no pickles): [H, W] / [C, H, W] or a stack [N, ...]."""
    path = Path(path)
    if not path.is_file():
        raise PPAPError(f"target map not found: {path}")
    if path.suffix.lower() != ".npy":
        raise PPAPError(f"--target-map must be a .npy file, got {path.name}")
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except ValueError as e:
        raise PPAPError(f"cannot read target map {path} ({e})") from None


def encode_png(images: np.ndarray, nrow: int) -> bytes:
    """uint8 [N, H, W, C] -> the PNG bytes of their grid."""
    import io

    from PIL import Image

    grid = image_grid(images, nrow)
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()
