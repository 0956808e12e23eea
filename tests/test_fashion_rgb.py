"""Colour Fashion-MNIST: the tint rule, its inverse, the per-index colours, and the prompts."""

import numpy as np
import pytest
import torch

from ppap import PPAPError
from ppap.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_dir, load_fashion_mnist
from ppap.fashion_rgb import (
    COLOUR_NAMES,
    COLOURS,
    PROMPT_TEMPLATES,
    all_prompts,
    colour_index,
    colour_prompt,
    draw_prompts,
    load_fashion_rgb,
    tint,
    untint,
)
from ppap.images import unit_to_uint8

needs_data = pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def test_tint_is_grey_times_colour_and_untint_recovers_the_grey_image():
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (16, 1, 6, 6), generator=g, dtype=torch.uint8)
    colours = torch.arange(16) % 8
    rgb = tint(grey, colours)
    for k in range(16):
        rgb_k = np.array(COLOURS[COLOUR_NAMES[int(colours[k])]], dtype=np.float64)
        expected = grey[k, 0].double().numpy()[None] / 255 * rgb_k[:, None, None]
        np.testing.assert_allclose(rgb[k].double().numpy(), expected, rtol=1e-6, atol=1e-4)
    back = untint(rgb, colours)
    assert back.shape == grey.shape
    assert (back - grey.float()).abs().max() < 1e-3
    assert torch.equal(back.round().to(torch.uint8), grey)
    assert torch.equal(tint(torch.zeros(1, 1, 2, 2), colours[:1]), torch.zeros(1, 3, 2, 2))  # black background


def test_colours_are_a_function_of_index_split_and_seed():
    k = np.arange(5000)
    a = colour_index(k)
    assert a.dtype == torch.int64 and int(a.min()) == 0 and int(a.max()) == 7
    assert torch.equal(colour_index(k[::-1].copy()), a.flip(0))  # order of reading does not matter
    assert torch.equal(colour_index(k[1234:1240]), a[1234:1240])
    assert int(colour_index(77)[0]) == int(a[77])
    assert torch.equal(colour_index(k), a)  # deterministic
    assert (colour_index(k, seed=1) != a).float().mean() > 0.8  # another seed, another draw (1/8 agree by chance)
    assert (colour_index(k, split="test") != a).float().mean() > 0.8
    counts = torch.bincount(a, minlength=8).float() / len(k)
    assert (counts - 1 / 8).abs().max() < 0.02  # balanced
    with pytest.raises(PPAPError, match="unknown split 'val'"):
        colour_index(k, split="val")


@needs_data
def test_loaded_split_is_the_padded_grey_split_tinted():
    data = load_fashion_rgb("test")
    x, labels = load_fashion_mnist("test")
    assert len(data) == 10_000 and torch.equal(data.labels, labels)
    assert torch.equal(data.colours, colour_index(np.arange(10_000), "test"))
    images = data.images(slice(0, 64))
    assert images.shape == (64, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    # padding: the 2-pixel frame is black in every channel
    frame = torch.ones(32, 32, dtype=torch.bool)
    frame[2:30, 2:30] = False
    assert bool((images[:, :, frame] == -1).all())
    # the grey image comes back from the colour image and its colour
    grey = untint((images + 1) * 127.5, data.colours[:64]).round().to(torch.uint8)
    assert torch.equal(grey, unit_to_uint8(x[:64]))


def test_prompts_name_the_colour_never_the_garment():
    prompts = all_prompts()
    assert len(prompts) == 8 and all(len(row) == len(PROMPT_TEMPLATES) for row in prompts)
    garment_words = {w for name in FASHION_MNIST_CLASSES for w in name.replace("/", " ").replace("-", " ").split()}
    for c, row in enumerate(prompts):
        for p in row:
            words = p.split()
            assert COLOUR_NAMES[c] in words
            assert not (set(words) & garment_words), p
            assert not (set(words) & (set(COLOUR_NAMES) - {COLOUR_NAMES[c]})), p
    assert colour_prompt("red") == "a red garment" and colour_prompt("orange") == "an orange garment"
    assert colour_prompt(0, 0) == "red"
    with pytest.raises(PPAPError, match="unknown colour 'purple'"):
        colour_prompt("purple")


def test_prompt_draws_are_seeded_and_about_ten_percent_empty():
    colours = torch.zeros(20_000, dtype=torch.long)
    t1, e1 = draw_prompts(colours, 0.1, torch.Generator().manual_seed(3))
    t2, e2 = draw_prompts(colours, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and torch.equal(e1, e2)
    assert abs(e1.float().mean().item() - 0.1) < 0.01
    assert set(t1.tolist()) == set(range(len(PROMPT_TEMPLATES)))
