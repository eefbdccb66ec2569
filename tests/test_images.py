"""Labelled image sheets (marval_rl/eval/images.py): layout size, exact nearest-neighbour pixels, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from marval_rl.eval.images import GAP, SEP, save_labelled_comparison, save_labelled_grid

W, S = 8, 3  # image side, upscale


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, W, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _labels(n: int) -> list[str]:
    return [f"class {i}" for i in range(n)]


def _scores(n: int, offset: float) -> dict:
    return {"clip": [0.5 + offset] * n, "cls": [0.25 + offset] * n}


def _compare(tmp_path, n: int, columns: int = 8, name: str = "c.png", **kw) -> np.ndarray:
    p = save_labelled_comparison(_images(n, 0), _images(n, 1), _labels(n), tmp_path / name, _scores(n, 0),
                                 _scores(n, 0.1), scale=S, columns=columns, **kw)
    return np.asarray(Image.open(p).convert("RGB"))


def _upscaled(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy().repeat(S, 0).repeat(S, 1)


def _find_row(sheet: np.ndarray, block: np.ndarray, x: int) -> list[int]:
    """The rows y where ``block`` sits exactly at (x, y) in ``sheet``."""
    h, w = block.shape[:2]
    return [y for y in range(sheet.shape[0] - h + 1) if np.array_equal(sheet[y:y + h, x:x + w], block)]


def test_comparison_size_follows_n_columns_and_scale(tmp_path):
    # catches: cells of the wrong width (scale or the before/after pair not applied) or rows miscounted
    cell_w = 2 * W * S + SEP + GAP
    full, one_row = _compare(tmp_path, 16, name="a.png"), _compare(tmp_path, 8, name="b.png")
    assert full.shape[1] == GAP + 8 * cell_w == one_row.shape[1]
    assert _compare(tmp_path, 9, name="c.png").shape == full.shape          # 9 images still take 2 rows
    assert _compare(tmp_path, 3, name="d.png").shape[1] == GAP + 3 * cell_w  # fewer images than columns
    assert _compare(tmp_path, 16, columns=4, name="e.png").shape[1] == GAP + 4 * cell_w
    grid = np.asarray(Image.open(save_labelled_grid(_images(16, 0), _labels(16), tmp_path / "g.png", scale=S)))
    assert grid.shape[1] == GAP + 8 * (W * S + GAP)


def test_comparison_pixels_are_the_nearest_upscaled_inputs(tmp_path):
    # catches: interpolation instead of nearest neighbour, before/after swapped, cells placed out of order
    before, after = _images(16, 0), _images(16, 1)
    sheet = _compare(tmp_path, 16, title="a title")
    cell_w = 2 * W * S + SEP + GAP
    x = GAP + 1 * cell_w                                       # cell 9: row 1, column 1
    rows_before = _find_row(sheet, _upscaled(before[9]), x)
    assert len(rows_before) == 1
    y = rows_before[0]
    assert np.array_equal(sheet[y:y + W * S, x + W * S + SEP:x + 2 * W * S + SEP], _upscaled(after[9]))
    cell_h = sheet.shape[0] - _compare(tmp_path, 8, name="one_row.png", title="a title").shape[0]
    assert _find_row(sheet, _upscaled(before[1]), x) == [y - cell_h]  # cell 1: the row above, same column
    # float input in [0, 1] gives the same sheet as its uint8 bytes
    p = save_labelled_comparison(before.float() / 255, after.float() / 255, _labels(16), tmp_path / "f.png",
                                 _scores(16, 0), _scores(16, 0.1), scale=S, title="a title")
    assert np.array_equal(np.asarray(Image.open(p).convert("RGB")), sheet)


def test_grid_pixels_are_the_nearest_upscaled_inputs(tmp_path):
    # catches: the plain grid upscaling or placing images differently from the comparison
    images = _images(5, 3)
    sheet = np.asarray(Image.open(save_labelled_grid(images, _labels(5), tmp_path / "g.png", scale=S,
                                                     columns=2)).convert("RGB"))
    x = GAP + 1 * (W * S + GAP)                                # image 3: row 1, column 1
    assert len(_find_row(sheet, _upscaled(images[3]), x)) == 1
    assert sheet.shape[1] == GAP + 2 * (W * S + GAP)


def test_bad_input_errors(tmp_path):
    # catches: mismatched labels, scores or shapes drawing a misleading sheet instead of failing
    b, a = _images(4, 0), _images(4, 1)
    with pytest.raises(ValueError, match=r"got 3 labels for 4 images \(one label per image\)"):
        save_labelled_comparison(b, a, _labels(3), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"got a single str for 4 images"):
        save_labelled_grid(b, "lion", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"before and after must be tensors of the same shape, got \(4, 3, 8, 8\) "
                                         r"and \(3, 3, 8, 8\)"):
        save_labelled_comparison(b, a[:3], _labels(4), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"before_scores and after_scores must have the same keys"):
        save_labelled_comparison(b, a, _labels(4), tmp_path / "x.png", {"clip": [0.0] * 4}, None)
    with pytest.raises(ValueError, match=r"at most 2 score keys fit under a cell, got 3: a, b, c"):
        s = {k: [0.0] * 4 for k in "abc"}
        save_labelled_comparison(b, a, _labels(4), tmp_path / "x.png", s, s)
    with pytest.raises(ValueError, match=r"score 'clip' needs 4 values before and after, got 3 and 4"):
        save_labelled_comparison(b, a, _labels(4), tmp_path / "x.png", {"clip": [0.0] * 3}, {"clip": [0.0] * 4})
    with pytest.raises(ValueError, match=r"scale must be an int >= 1, got 0"):
        save_labelled_grid(b, _labels(4), tmp_path / "x.png", scale=0)
    with pytest.raises(ValueError, match=r"columns must be an int >= 1, got 0"):
        save_labelled_grid(b, _labels(4), tmp_path / "x.png", columns=0)
    with pytest.raises(ValueError, match=r"images must be a tensor \[N, 3, h, w\], got \(4, 8, 8\)"):
        save_labelled_grid(b[:, 0], _labels(4), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"images is empty \(N = 0\): nothing to draw"):
        save_labelled_grid(b[:0], [], tmp_path / "x.png")
