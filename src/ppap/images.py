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


def labelled_grid(
    images: np.ndarray, rows: list[str], cols: list[str], zoom: int | None = None, pad: int = 6, font_size: int = 14
) -> np.ndarray:
    """uint8 tiles [R * C, H, W, ch] (row-major, ch 1 or 3) -> one uint8 [H', W', ch] image with
    the row labels in a strip on the left and the column labels in a strip on top (PIL's default
    font at ``font_size`` px, black on white). Each tile is enlarged ``zoom`` times by nearest neighbour (default: the
    smallest factor that makes it at least 64 px high, so labels do not dwarf 32x32 images) and
    placed unaltered, centred in a cell as wide as its column label needs; cells are ``pad`` apart.
    """
    from PIL import Image, ImageDraw, ImageFont

    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise PPAPError(f"labelled_grid takes uint8 [N, H, W, 1 or 3] tiles, got shape {tuple(images.shape)}")
    if len(images) != len(rows) * len(cols):
        raise PPAPError(f"{len(images)} tiles do not fill {len(rows)} labelled rows x {len(cols)} labelled columns")
    _, h, w, ch = images.shape
    zoom = zoom or -(-64 // h)
    if zoom < 1:
        raise PPAPError(f"tile zoom must be >= 1, got {zoom}")
    tiles = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    h, w = h * zoom, w * zoom
    font = ImageFont.load_default(font_size)

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = font.getbbox(text)
        return int(right - left), int(bottom)

    top = max(size(c)[1] for c in cols) + 2 * pad
    left = max(size(r)[0] for r in rows) + 2 * pad
    cell = max([w] + [size(c)[0] + pad for c in cols])
    canvas = Image.new("L" if ch == 1 else "RGB", (left + len(cols) * (cell + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(cols):
        draw.text((left + pad + j * (cell + pad) + (cell - size(text)[0]) // 2, pad), text, fill="black", font=font)
    for i, text in enumerate(rows):
        y = top + pad + i * (h + pad)
        draw.text((pad, y + (h - size(text)[1]) // 2), text, fill="black", font=font)
        for j in range(len(cols)):
            tile = tiles[i * len(cols) + j]
            canvas.paste(Image.fromarray(tile[..., 0] if ch == 1 else tile), (left + pad + j * (cell + pad) + (cell - w) // 2, y))
    out = np.asarray(canvas, dtype=np.uint8)
    return out[..., None] if ch == 1 else out.copy()


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 1 or 3] -> PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()
