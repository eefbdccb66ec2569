"""emoji-56: an offline, deterministic dataset of rendered emoji whose class names are ImageNet classes.

The 56 Noto Color Emoji glyphs live in a committed RGBA sprite sheet (``assets/emoji56.png``, 8 columns of
64x64 sprites, built by ``scripts/make_emoji_sheet.py``) next to the class table ``assets/emoji56.csv``
(index, name, codepoint, ImageNet-1k index). Nothing here needs the font or apt.

Rendering: every image ``i`` gets its own RNG, ``np.random.default_rng([seed, start_index + i])``, which draws a
fixed vector of uniforms that the :class:`Augment` maps to background, scale, rotation, shift, flip and colour
jitter. So an image depends only on (class, size, seed, augment, index), never on what else is in the batch.
The sprite is warped (premultiplied alpha, bilinear) onto a canvas 4x the output size, box-filtered down to the
output size (anti-aliasing by supersampling), then composited over a solid background and colour-jittered.
"""
from __future__ import annotations

import csv
import functools
import math
import zlib
from collections import OrderedDict
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["EmojiClass", "emoji_classes", "class_names", "load_sprites", "Augment", "render", "split_seed",
           "EmojiDataset", "NUM_CLASSES"]

_ASSETS = Path(__file__).resolve().parent / "assets"
NUM_CLASSES = 56
_SPRITE = 64          # sprite side in the sheet
_SUPERSAMPLE = 4      # canvas = 4 x output size, then a 4x4 box filter
_NUM_UNIFORMS = 12    # uniforms drawn per image, whatever the preset (keeps streams aligned across presets)


# ---- Class table and sprites ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmojiClass:
    name: str             # ImageNet-compatible entity name, e.g. "fire engine"
    codepoint: str        # "U+1F692"
    imagenet_index: int   # index into the 1000 ImageNet-1k classes

    @property
    def char(self) -> str:
        return chr(int(self.codepoint[2:], 16))


@functools.lru_cache(maxsize=None)
def _class_table() -> tuple[EmojiClass, ...]:
    with open(_ASSETS / "emoji56.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if [int(r["index"]) for r in rows] != list(range(NUM_CLASSES)):
        raise RuntimeError(f"{_ASSETS / 'emoji56.csv'} must list indices 0..{NUM_CLASSES - 1} in order")
    return tuple(EmojiClass(r["name"], r["codepoint"], int(r["imagenet_index"])) for r in rows)


def emoji_classes() -> list[EmojiClass]:
    """The 56 classes in label order."""
    return list(_class_table())


def class_names() -> list[str]:
    return [c.name for c in _class_table()]


@functools.lru_cache(maxsize=None)
def _sheet() -> torch.Tensor:
    sheet = np.asarray(Image.open(_ASSETS / "emoji56.png").convert("RGBA"))  # [rows*64, 8*64, 4]
    cols = sheet.shape[1] // _SPRITE
    tiles = [sheet[(i // cols) * _SPRITE:(i // cols + 1) * _SPRITE, (i % cols) * _SPRITE:(i % cols + 1) * _SPRITE]
             for i in range(NUM_CLASSES)]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def load_sprites() -> torch.Tensor:
    """All sprites as uint8 RGBA ``[56, 4, 64, 64]`` (a fresh copy; safe to modify)."""
    return _sheet().clone()


@functools.lru_cache(maxsize=8)
def _premultiplied_sprites(canvas: int) -> torch.Tensor:
    """Float sprites in [0, 1] with RGB premultiplied by alpha, so resampling never bleeds the (meaningless)
    colour of transparent pixels into edges. For small canvases the sprites are first shrunk with an
    anti-aliased filter: bilinear ``grid_sample`` alone would alias when minifying by more than ~2x."""
    rgba = _sheet().float() / 255.0
    rgba = torch.cat([rgba[:, :3] * rgba[:, 3:], rgba[:, 3:]], dim=1)
    if canvas < _SPRITE:
        rgba = F.interpolate(rgba, size=(canvas, canvas), mode="bilinear", antialias=True, align_corners=False)
    return rgba.contiguous()


# ---- Augmentation ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Augment:
    """Random rendering parameters. Amplitudes are symmetric: rotation +-``rotation`` degrees, shift +-``shift``
    of the canvas (clamped so the sprite box stays inside the canvas), jitter factors in [1 - j, 1 + j]."""
    background: str = "white"                  # white | random (uniform RGB) | mixed (50% white)
    scale: tuple[float, float] = (0.8, 0.8)    # sprite side / canvas side
    rotation: float = 0.0
    shift: float = 0.0
    flip: float = 0.0                          # probability of a horizontal flip
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0                    # "colour" jitter

    def __post_init__(self) -> None:
        if self.background not in ("white", "random", "mixed"):
            raise ValueError(f"Augment.background must be white|random|mixed, got {self.background!r}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"Augment.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"Augment.flip is a probability, got {self.flip}")
        for name in ("rotation", "shift", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"Augment.{name} must be >= 0, got {getattr(self, name)}")
        if max(self.brightness, self.contrast, self.saturation) >= 1.0:
            raise ValueError("Augment jitter amplitudes must be < 1 (a factor of 0 would blank the image)")

    PRESETS = ("none", "light", "full")

    @classmethod
    def preset(cls, name: str) -> "Augment":
        """none: clean centred sprite; light: for training generators (varied, still clean);
        full: for classifiers / CLIP (coloured backgrounds, strong geometry and colour jitter)."""
        if name == "none":
            return cls()
        if name == "light":
            return cls(scale=(0.7, 0.9), rotation=8.0, shift=0.05, flip=0.5)
        if name == "full":
            return cls(background="mixed", scale=(0.55, 0.95), rotation=20.0, shift=0.15, flip=0.5,
                       brightness=0.25, contrast=0.25, saturation=0.25)
        raise ValueError(f"unknown augment preset {name!r}; valid presets: {', '.join(cls.PRESETS)}")

    @classmethod
    def resolve(cls, augment: Union[str, "Augment"]) -> "Augment":
        return augment if isinstance(augment, Augment) else cls.preset(augment)

    @property
    def has_jitter(self) -> bool:
        return max(self.brightness, self.contrast, self.saturation) > 0

    def params(self, seed: int, index: int) -> np.ndarray:
        """Parameters of image ``index``: [bg_r, bg_g, bg_b, scale, angle_rad, dx, dy, flip, b, c, s]."""
        u = np.random.default_rng([seed, index]).random(_NUM_UNIFORMS)
        white = self.background == "white" or (self.background == "mixed" and u[0] < 0.5)
        bg = np.ones(3) if white else u[1:4]
        lo, hi = self.scale
        scale = lo + (hi - lo) * u[4]
        angle = math.radians(self.rotation * (2 * u[5] - 1))
        # Never push the sprite box off the canvas: a clipped sprite is a different (wrong) picture.
        max_shift = min(self.shift, (1.0 - scale) / 2)
        dx, dy = max_shift * (2 * u[6] - 1), max_shift * (2 * u[7] - 1)
        flip = float(u[8] < self.flip)
        jitter = [1 + amp * (2 * v - 1) for amp, v in zip((self.brightness, self.contrast, self.saturation), u[9:12])]
        return np.array([*bg, scale, angle, dx, dy, flip, *jitter], dtype=np.float64)


# ---- Rendering ------------------------------------------------------------------------------------------------
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def _jitter(img: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (torchvision's definitions), clamping after each like torchvision."""
    img = (img * b).clamp(0, 1)
    mean = (img * _LUMA).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    img = ((img - mean) * c + mean).clamp(0, 1)
    gray = (img * _LUMA).sum(1, keepdim=True)
    return ((img - gray) * s + gray).clamp(0, 1)


def _render_chunk(class_ids: torch.Tensor, params: torch.Tensor, size: int, aug: Augment) -> torch.Tensor:
    canvas = _SUPERSAMPLE * size
    n = class_ids.numel()
    p = params.float().view(n, -1, 1, 1)
    bg, scale, angle, dx, dy, flip = p[:, 0:3], p[:, 3], p[:, 4], p[:, 5], p[:, 6], p[:, 7]
    # Pixel-centre coordinates of the output canvas in [-1, 1] (grid_sample's align_corners=False convention).
    lin = (torch.arange(canvas, dtype=torch.float32) * 2 + 1) / canvas - 1
    xs, ys = lin.view(1, 1, canvas) - 2 * dx, lin.view(1, canvas, 1) - 2 * dy  # shift is a fraction of the side
    # Inverse warp, written element-wise (no batched matmul) so every image's numbers are independent of the
    # batch: sprite coords = mirror(R(-angle) (p - t) / scale).
    cos, sin = torch.cos(angle), torch.sin(angle)
    qx = (cos * xs + sin * ys) / scale * (1 - 2 * flip)
    qy = (cos * ys - sin * xs) / scale
    grid = torch.stack([qx, qy], dim=-1)
    src = _premultiplied_sprites(canvas)[class_ids]
    warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    small = F.avg_pool2d(warped, _SUPERSAMPLE)                    # box filter: canvas -> size
    img = small[:, :3] + (1 - small[:, 3:]) * bg                  # "over" a solid background (premultiplied)
    if aug.has_jitter:
        img = _jitter(img, p[:, 8:9], p[:, 9:10], p[:, 10:11])
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def render(class_ids: Sequence[int] | torch.Tensor, size: int = 32, seed: int = 0,
           augment: Union[str, Augment] = "full", start_index: int = 0) -> torch.Tensor:
    """Render emoji ``class_ids`` (label indices 0..55) as uint8 RGB ``[N, 3, size, size]``.

    Image ``i`` uses the RNG stream ``(seed, start_index + i)``: rendering ``[c]`` with ``start_index=k`` gives
    the same bytes as element ``k`` of a longer call. ``size`` is any int >= 8.
    """
    aug = Augment.resolve(augment)
    ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= NUM_CLASSES):
        raise ValueError(f"class ids must be in [0, {NUM_CLASSES - 1}], got {ids.min().item()}..{ids.max().item()}")
    if int(size) != size or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    if seed < 0 or start_index < 0:
        raise ValueError(f"seed and start_index must be >= 0, got {seed}, {start_index}")
    size = int(size)
    out = torch.empty(ids.numel(), 3, size, size, dtype=torch.uint8)
    if not ids.numel():
        return out
    params = torch.from_numpy(np.stack([aug.params(seed, start_index + i) for i in range(ids.numel())]))
    # Chunk so the supersampled canvases stay around 100 MB whatever the size.
    chunk = max(1, 2**27 // (48 * (_SUPERSAMPLE * size) ** 2))
    with torch.no_grad():
        for lo in range(0, ids.numel(), chunk):
            out[lo:lo + chunk] = _render_chunk(ids[lo:lo + chunk], params[lo:lo + chunk], size, aug)
    return out


def split_seed(seed: int, split: str) -> int:
    """A seed for ``render`` unique to (seed, split): the train and test streams never coincide."""
    state = np.random.SeedSequence([int(seed), zlib.crc32(split.encode("utf-8"))]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


# ---- Dataset --------------------------------------------------------------------------------------------------
_RENDER_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()  # in memory only; last few renders
_CACHE_SIZE = 6


def _cached_render(ids: tuple[int, ...], size: int, seed: int, aug: Augment) -> torch.Tensor:
    key = (ids, size, seed, astuple(aug))
    if key not in _RENDER_CACHE:
        _RENDER_CACHE[key] = render(list(ids), size, seed, aug)
        while len(_RENDER_CACHE) > _CACHE_SIZE:
            _RENDER_CACHE.popitem(last=False)
    _RENDER_CACHE.move_to_end(key)
    return _RENDER_CACHE[key].clone()  # callers may modify their copy


def _resolve_classes(classes: Sequence[int | str] | None) -> list[int]:
    if classes is None:
        return list(range(NUM_CLASSES))
    names = class_names()
    ids = []
    for c in classes:
        if isinstance(c, str):
            if c not in names:
                raise ValueError(f"unknown emoji class {c!r}; valid names: {', '.join(names)}")
            ids.append(names.index(c))
        elif 0 <= int(c) < NUM_CLASSES:
            ids.append(int(c))
        else:
            raise ValueError(f"emoji class id {c} out of range [0, {NUM_CLASSES - 1}]")
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"classes must be a non-empty list without repeats, got {list(classes)}")
    return ids


class EmojiDataset(Dataset):
    """Eagerly rendered emoji-56 split: ``images`` uint8 [N, 3, H, W] and ``labels`` int64 [N].

    Order is *interleaved*: item ``i`` shows class ``classes[i % K]``, and it is rendered from stream ``i``, so a
    smaller ``per_class`` gives a prefix of a larger one. Labels are positions in ``classes`` (0..K-1; equal to
    the emoji-56 index when ``classes`` is None); ``class_ids`` maps them back to emoji-56 indices. The split
    name selects the seed stream (:func:`split_seed`), so train and test images differ, except with
    ``augment="none"``, which has no randomness at all: every render of a class is then the same picture.
    """

    def __init__(self, split: str = "train", image_size: int = 32, per_class: int = 64, seed: int = 0,
                 augment: Union[str, Augment] = "full", classes: Sequence[int | str] | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if per_class < 0:
            raise ValueError(f"per_class must be >= 0, got {per_class}")
        self.split, self.image_size, self.per_class, self.seed = split, int(image_size), int(per_class), int(seed)
        self.augment = Augment.resolve(augment)
        self.class_ids = _resolve_classes(classes)
        k = len(self.class_ids)
        self.labels = torch.arange(k * self.per_class, dtype=torch.int64) % k
        ids = tuple(self.class_ids[i] for i in self.labels.tolist())
        self.images = _cached_render(ids, self.image_size, split_seed(self.seed, split), self.augment)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def class_names(self) -> list[str]:
        names = class_names()
        return [names[i] for i in self.class_ids]

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float() / 127.5 - 1.0, int(self.labels[i])
