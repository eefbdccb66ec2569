"""Image output: latents -> [0, 1] images, PNG grids (torchvision), per-image PNGs and labelled sheets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] images in [0, 1] -> uint8 HWC arrays, rounded as MAR saves them."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_images(images: torch.Tensor, directory: str | Path, names: list[str]) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for arr, name in zip(to_uint8(images), names):
        p = directory / f"{name}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(grid[None])[0]).save(path)
    return path


# ---- labelled sheets: a grid of cells, each an image block with caption lines under it ------------------------
GAP = 10         # pixels around and between cells
SEP = 2          # pixels between the before and after image of a comparison cell
FONT_SIZE = 12
BACKGROUND = (236, 236, 236)  # light grey, so white-background images show their edges


def _font(size: int = FONT_SIZE):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _upscaled_uint8(images: torch.Tensor, scale: int, what: str) -> np.ndarray:
    """[N, 3, h, w] uint8 or [0, 1] float -> [N, h * scale, w * scale, 3] uint8 (nearest neighbour)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a tensor [N, 3, h, w], got {shape}")
    if len(images) == 0:
        raise ValueError(f"{what} is empty (N = 0): nothing to draw")
    arr = images.permute(0, 2, 3, 1).cpu().numpy() if images.dtype == torch.uint8 else to_uint8(images)
    return arr.repeat(scale, axis=1).repeat(scale, axis=2)


def _fit(draw, text: str, width: int, font, tail: str = "") -> str:
    """``text + tail`` in ``width`` pixels: ``text`` cut (with '...') where needed, ``tail`` kept whole."""
    if draw.textlength(text + tail, font=font) <= width:
        return text + tail
    while text and draw.textlength(text + "..." + tail, font=font) > width:
        text = text[:-1]
    return text + "..." + tail


def _save_sheet(blocks: list[list[np.ndarray]], captions: list[list[str | tuple[str, str]]], path, columns: int,
                title: str | None, header: list[str] | None) -> Path:
    """Write cells (each a row of equally sized images, ``SEP`` apart, caption lines under it) ``columns`` to
    a row; ``header`` names the images of a cell once, above the first row; ``title`` is a line above that.
    A caption line ``(text, tail)`` is cut in ``text`` only, so the numbers in ``tail`` always show."""
    from PIL import ImageDraw

    if not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be an int >= 1, got {columns!r}")
    font, big = _font(), _font(FONT_SIZE + 2)
    h, w = blocks[0][0].shape[:2]
    k = len(blocks[0])
    block_w = k * w + (k - 1) * SEP
    line_h = FONT_SIZE + 3
    cols, rows = min(columns, len(blocks)), -(-len(blocks) // columns)
    cell_w, cell_h = block_w + GAP, h + GAP + line_h * max(len(c) for c in captions)
    top = GAP + (line_h + 4 if title else 0) + (line_h if header else 0)
    sheet = Image.new("RGB", (GAP + cols * cell_w, top + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((GAP, GAP), _fit(draw, title, sheet.width - 2 * GAP, big), fill="black", font=big)
    for c in range(cols if header else 0):
        for j, name in enumerate(header):
            x = GAP + c * cell_w + j * (w + SEP) + w / 2
            draw.text((x, top - 2), _fit(draw, name, w, font), fill=(90, 90, 90), font=font, anchor="md")
    for i, (images, lines) in enumerate(zip(blocks, captions)):
        x0, y0 = GAP + (i % columns) * cell_w, top + (i // columns) * cell_h
        for j, arr in enumerate(images):
            sheet.paste(Image.fromarray(arr), (x0 + j * (w + SEP), y0))
        for j, line in enumerate(lines):
            text, tail = (line, "") if isinstance(line, str) else line
            draw.text((x0, y0 + h + 2 + j * line_h), _fit(draw, text, block_w, font, tail),
                      fill="black" if j == 0 else (60, 60, 60), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _check_scale(scale) -> int:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    return scale


def _check_labels(labels, n: int) -> list[str]:
    if isinstance(labels, str) or len(labels) != n:
        got = "a single str" if isinstance(labels, str) else f"{len(labels)} labels"
        raise ValueError(f"got {got} for {n} images (one label per image)")
    return [str(s) for s in labels]


def save_labelled_grid(images: torch.Tensor, labels: list[str], path: str | Path, scale: int = 3,
                       columns: int = 8, title: str | None = None) -> Path:
    """One PNG: ``images`` (uint8 or [0, 1] float ``[N, 3, h, w]``) upscaled ``scale``x (nearest neighbour),
    ``columns`` to a row, each with its label under it; ``title`` on a line above."""
    ups = _upscaled_uint8(images, _check_scale(scale), "images")
    labels = _check_labels(labels, len(ups))
    return _save_sheet([[a] for a in ups], [[s] for s in labels], path, columns, title, header=None)


def _score_lines(before: dict | None, after: dict | None, n: int) -> list[list[tuple[str, str]]]:
    """Per image, one ('key', ' 0.79 -> 0.83') line per score key (at most 2)."""
    if before is None and after is None:
        return [[] for _ in range(n)]
    if before is None or after is None or list(before) != list(after):
        raise ValueError(f"before_scores and after_scores must have the same keys, got "
                         f"{None if before is None else list(before)} and {None if after is None else list(after)}")
    if len(before) > 2:
        raise ValueError(f"at most 2 score keys fit under a cell, got {len(before)}: {', '.join(before)}")
    for key in before:
        if len(before[key]) != n or len(after[key]) != n:
            raise ValueError(f"score {key!r} needs {n} values before and after, got {len(before[key])} and "
                             f"{len(after[key])}")
    return [[(k, f" {float(before[k][i]):.2f} -> {float(after[k][i]):.2f}") for k in before] for i in range(n)]


def save_labelled_comparison(before: torch.Tensor, after: torch.Tensor, labels: list[str], path: str | Path,
                             before_scores: dict[str, list[float]] | None = None,
                             after_scores: dict[str, list[float]] | None = None, scale: int = 3,
                             columns: int = 8, title: str | None = None) -> Path:
    """One PNG comparing two image sets of the same prompts and seeds (uint8 or [0, 1] float ``[N, 3, h, w]``).

    Each cell shows ``before[i]`` and ``after[i]`` side by side, upscaled ``scale``x (nearest neighbour), with
    ``labels[i]`` (the class name) under them and, per score key (at most 2), ``key before -> after`` to 2
    decimals. A header row says which image is which; ``title`` goes on a line above it.
    """
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or before.shape != after.shape:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (before, after)]
        raise ValueError(f"before and after must be tensors of the same shape, got {shapes[0]} and {shapes[1]}")
    scale = _check_scale(scale)
    b, a = _upscaled_uint8(before, scale, "before"), _upscaled_uint8(after, scale, "after")
    labels = _check_labels(labels, len(b))
    scores = _score_lines(before_scores, after_scores, len(b))
    return _save_sheet([[x, y] for x, y in zip(b, a)], [[s, *lines] for s, lines in zip(labels, scores)], path,
                       columns, title, header=["before", "after"])
