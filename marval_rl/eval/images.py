"""Image output: latents -> [0, 1] images, PNG grids (torchvision) and per-image PNGs."""
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
