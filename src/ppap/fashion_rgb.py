"""Colour Fashion-MNIST: Fashion-MNIST tinted with one of 8 colours per image, and colour prompts.

The rule, for image k of a split (28x28 grey values g in 0..255, zero-padded to 32x32):

* its colour is ``COLOUR_NAMES[colour_index(k)]``, drawn by a seeded counter-based generator
  keyed by the image's index (SplitMix64 of ``(seed, split, k)``, modulo 8), so any image's colour
  is known without reading the others and never changes with the order images are read in;
* each RGB channel c is ``g / 255 * colour[c]`` on a black background (0 stays 0).

The grey image is recovered from the colour image and its colour (``untint``). Images are float
tensors [N, 3, 32, 32] in [-1, 1], as everywhere in ppap.

Prompts name the colour only ("red", "a red garment", "something in red", ...), never the
garment: a text-conditional model learns the colour from the prompt and the garment from nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .fashion_mnist import load_fashion_mnist
from .images import unit_to_uint8
from .io import PPAPError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 190, 200),
    "orange": (240, 130, 30),
    "white": (235, 235, 235),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_TABLE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [8, 3], 0..255
SPLITS = {"train": 0, "test": 1}

# "{colour}" is replaced by a colour's name; "a" before a vowel becomes "an"
PROMPT_TEMPLATES = (
    "{colour}",
    "a {colour} garment",
    "something in {colour}",
    "a {colour} piece of clothing",
    "{colour} clothes",
    "an item in {colour}",
    "clothing coloured {colour}",
)
# the tokenizer's vocabulary: the templates' words, the colours, and a few words of prompts people write
PROMPT_WORDS = tuple(
    dict.fromkeys(
        [w for t in PROMPT_TEMPLATES for w in t.replace("{colour}", "").split()]
        + list(COLOUR_NAMES)
        + ["an", "the", "one", "colored", "color", "colour", "garments", "items", "thing", "with", "and", "of"]
    )
)
PROMPT_MAX_LENGTH = 8  # tokens per prompt (the longest template has 6)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014) on uint64 counters."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def colour_index(index: Tensor | np.ndarray | int, split: str = "train", seed: int = 0) -> Tensor:
    """The colour (0..7, into ``COLOUR_NAMES``) of images ``index`` [N] of ``split``: SplitMix64
    of the counter ``seed * 2**33 + split * 2**32 + k``, modulo 8."""
    if split not in SPLITS:
        raise PPAPError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    k = np.asarray(index, dtype=np.uint64).reshape(-1)
    counter = np.uint64(seed) * np.uint64(1 << 33) + np.uint64(SPLITS[split] << 32) + k
    return torch.from_numpy((_splitmix64(counter) % np.uint64(len(COLOURS))).astype(np.int64))


def tint(grey: Tensor, colours: Tensor) -> Tensor:
    """Colour images [N, 3, H, W] (float, 0..255) from grey images [N, 1, H, W] (0..255) and
    colour indices [N]: channel c = grey / 255 * colour[c]."""
    return grey.float() / 255 * COLOUR_TABLE[colours][:, :, None, None]


def untint(rgb: Tensor, colours: Tensor) -> Tensor:
    """The grey images [N, 1, H, W] (float, 0..255) of colour images [N, 3, H, W] (0..255) of
    colour indices [N], read from each colour's brightest channel (the most precise)."""
    table = COLOUR_TABLE[colours]  # [N, 3]
    channel = table.argmax(1)
    picked = rgb[torch.arange(len(rgb)), channel][:, None]
    return picked * 255 / table.max(1).values[:, None, None, None]


# --------------------------------------------------------------------------------------------
# colour fidelity: is a garment the colour its prompt names?
# --------------------------------------------------------------------------------------------

# a garment pixel's brightest channel exceeds 0.1 of full intensity: the grey world's foreground
# rule (``ppap.models.FOREGROUND_THRESHOLD``, which labels the segmenters' training masks) on the
# brightest channel, so that a dark colour's garment is not taken for background
GARMENT_THRESHOLD = -0.8  # in [-1, 1] units


def garment_mask(x: Tensor) -> Tensor:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W] bool: the pixels whose brightest channel exceeds
    ``GARMENT_THRESHOLD`` (the black background and faint noise on it are left out)."""
    return x.amax(1) > GARMENT_THRESHOLD


def nearest_colour(x: Tensor) -> Tensor:
    """[N] index into ``COLOUR_NAMES`` of the colour nearest to the mean colour of each image's
    garment pixels (``garment_mask``), -1 for an image without any. Nearest by angle (cosine of
    the RGB vectors in 0..255): a tinted pixel is its colour times its grey level, so the mean is
    the colour times the mean brightness, whose direction alone names the colour (by Euclidean
    distance a mid-grey white garment would be nearer magenta than white)."""
    mask = garment_mask(x)
    rgb = (x.float() + 1) * 127.5
    count = mask.flatten(1).sum(1)
    mean = (rgb * mask[:, None]).flatten(2).sum(2) / count.clamp_min(1)[:, None]  # [N, 3]
    cosine = torch.nn.functional.normalize(mean, dim=1) @ torch.nn.functional.normalize(COLOUR_TABLE.to(mean), dim=1).T  # [N, 8]
    return torch.where(count > 0, cosine.argmax(1), -1)


def colour_fidelity(x: Tensor, colours: Tensor) -> float:
    """The share of images x [N, 3, H, W] in [-1, 1] whose garment's mean colour is nearest
    (``nearest_colour``) to the prompt's colour ``colours`` [N] (indices into ``COLOUR_NAMES``);
    an image with no garment pixel counts as a miss."""
    return (nearest_colour(x) == colours.to(x.device)).float().mean().item()


def to_unit(rgb: Tensor) -> Tensor:
    """0..255 -> [-1, 1] (the diffusion models' range)."""
    return rgb / 127.5 - 1


@dataclass(frozen=True)
class FashionRGB:
    """One split of colour Fashion-MNIST, kept compact: the padded grey images as uint8, the
    garment labels and the colour indices. ``images(index)`` tints on demand."""

    grey: Tensor  # [N, 1, 32, 32] uint8
    labels: Tensor  # [N] int64, garment class (ppap.fashion_mnist.FASHION_MNIST_CLASSES)
    colours: Tensor  # [N] int64, colour (COLOUR_NAMES)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def images(self, index: Tensor | slice | None = None) -> Tensor:
        """Float [n, 3, 32, 32] in [-1, 1] of the images ``index`` (all when None)."""
        index = slice(None) if index is None else index
        return to_unit(tint(self.grey[index], self.colours[index]))


def load_fashion_rgb(split: str = "train", data_dir: str | os.PathLike | None = None, seed: int = 0) -> FashionRGB:
    """Colour Fashion-MNIST from Debian's Fashion-MNIST (``ppap.fashion_mnist.load_fashion_mnist``)."""
    x, labels = load_fashion_mnist(split, data_dir)
    return FashionRGB(unit_to_uint8(x), labels, colour_index(np.arange(len(labels)), split, seed))


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


def colour_prompt(colour: int | str, template: int = 1) -> str:
    """Template ``template`` of ``PROMPT_TEMPLATES`` for a colour (index or name), e.g. "a red garment"."""
    name = colour if isinstance(colour, str) else COLOUR_NAMES[colour]
    if name not in COLOURS:
        raise PPAPError(f"unknown colour {name!r}; valid: {', '.join(COLOUR_NAMES)}")
    return re.sub(r"\ba (?=[aeiou])", "an ", PROMPT_TEMPLATES[template].format(colour=name))


def all_prompts() -> list[list[str]]:
    """Every training prompt: [colour][template]."""
    return [[colour_prompt(c, j) for j in range(len(PROMPT_TEMPLATES))] for c in range(len(COLOURS))]


def draw_prompts(colours: Tensor, empty_prob: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per sample a template index [N] (uniform) and whether its prompt is empty [N] bool (with
    probability ``empty_prob``, for classifier-free guidance), both drawn from ``g``."""
    templates = torch.randint(0, len(PROMPT_TEMPLATES), colours.shape, generator=g)
    empty = torch.rand(colours.shape, generator=g) < empty_prob
    return templates, empty
