"""labelled_grid: every tile at its cell, unaltered, with its row and column labels drawn in."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from ppap.images import labelled_grid
from ppap.io import PPAPError


def _where(image: np.ndarray, tile: np.ndarray) -> list[tuple[int, int]]:
    """Every (y, x) at which ``tile`` [h, w, c] appears in ``image`` [H, W, c] exactly."""
    windows = sliding_window_view(image, tile.shape)[:, :, 0]
    return [tuple(p) for p in np.argwhere((windows == tile).all(axis=(2, 3, 4)))]


def _tiles(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, (n, h, w, c), dtype=np.uint8)  # never pure white


@pytest.mark.parametrize("channels", [1, 3])
def test_tiles_sit_unaltered_in_a_row_major_grid_below_and_right_of_their_labels(channels):
    tiles = _tiles(6, 40, 48, channels)
    out = labelled_grid(tiles, rows=["sneaker", "bag"], cols=["a", "b", "c"], zoom=1, pad=5)
    assert out.dtype == np.uint8 and out.shape[-1] == channels
    spots = [_where(out, t) for t in tiles]
    assert all(len(s) == 1 for s in spots), spots  # each tile once, pixel for pixel
    ys = np.array([s[0][0] for s in spots]).reshape(2, 3)
    xs = np.array([s[0][1] for s in spots]).reshape(2, 3)
    assert (ys == ys[:, :1]).all() and (xs == xs[:1]).all()  # rows share a y, columns an x
    assert (np.diff(ys[:, 0]) == 40 + 5).all() and (np.diff(xs[0]) == 48 + 5).all()  # labels shorter than tiles: cells = tiles
    # the output ends one pad after the last tile; the label strips lie above and left of the tiles
    assert out.shape[:2] == (ys[-1, 0] + 40 + 5, xs[0, -1] + 48 + 5)
    top, left = ys[0, 0], xs[0, 0]
    assert top > 5 and left > 5
    assert (out[:top, left:] < 128).any()  # column labels drawn
    assert (out[top:, :left] < 128).any()  # row labels drawn
    for y in ys[:, 0]:  # each row's label is beside its row
        assert (out[y : y + 40, :left] < 128).any()


def test_tiny_tiles_are_enlarged_by_nearest_neighbour_and_cells_widen_for_long_column_labels():
    tiles = _tiles(2, 8, 8, 3, seed=1)
    out = labelled_grid(tiles, rows=["t"], cols=["unguided", "ppap (fresh experts)"])
    big = tiles.repeat(8, axis=1).repeat(8, axis=2)  # 8 px -> at least 64 px: zoom 8
    spots = [_where(out, t) for t in big]
    assert all(len(s) == 1 for s in spots), spots
    (y0, x0), (y1, x1) = spots[0][0], spots[1][0]
    assert y0 == y1 and x1 - x0 > 64 + 6  # the long label made the cells wider than the tiles
    assert (out[:y1, x1 : x1 + 64] < 128).any()  # the long label above its tile


@pytest.mark.parametrize(
    "rows, cols, match",
    [(["a"], ["x", "y"], "6 tiles do not fill 1 labelled rows x 2 labelled columns"), (["a", "b", "c"], ["x"], "do not fill")],
)
def test_label_counts_that_do_not_match_the_tiles_are_a_one_line_error(rows, cols, match):
    with pytest.raises(PPAPError, match=match) as e:
        labelled_grid(_tiles(6, 4, 4, 1), rows=rows, cols=cols)
    assert "\n" not in str(e.value)


def test_the_ui_download_shows_each_methods_marked_grid_under_its_name(tmp_path):
    from PIL import Image

    from ppap.ui_compare import Comparison, MethodResult, marked_grid, write_downloads

    targets = np.array([0, 1, 2, 3])
    results = {
        m: MethodResult(m, _tiles(4, 8, 8, 1, seed=k), 1.0, [30.0], m, verdicts=np.array([0, 1, 0, 0]))
        for k, m in enumerate(("unguided", "ppap"))
    }
    comparison = Comparison(results=results, targets=targets, classes=tuple("abcd"), judge="j")
    png, npz = write_downloads(comparison, tmp_path)
    out = np.asarray(Image.open(png).convert("RGB"))
    spots = [_where(out, marked_grid(r.images, comparison.hits(m))) for m, r in results.items()]
    assert all(len(s) == 1 for s in spots), spots
    (y0, x0), (y1, x1) = spots[0][0], spots[1][0]
    assert y0 == y1 and x1 > x0 and (out[:y0] < 128).any()  # side by side, the names above
    assert (np.load(npz)["images_ppap"] == results["ppap"].images).all()
