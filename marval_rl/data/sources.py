"""Training-data sources: an ImageFolder tree (ImageNet layout), cached VAE latents, and the dispatcher
:func:`build_source` that turns a recipe's ``data:`` section into a ``torch.utils.data.Dataset``.

Every image source yields ``(image float [3, H, W] in [-1, 1], int label)``; the latent source yields
``(moments float [2C, h, w], int label)`` (rebuild the posterior with ``DiagonalGaussian(moments[None])``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..models.checkpoints import atomic_write
from .emoji import EmojiDataset

from marval_rl import strict_json

if TYPE_CHECKING:
    from ..config import DataSection

__all__ = ["center_crop_arr", "ImageFolderSource", "cache_latents", "CachedLatentSource", "build_source",
           "SOURCES"]

SOURCES = ("emoji", "imagefolder", "latents")
LATENT_FORMAT = "marval-rl-latents/1"


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM / MAR preprocessing: halve with a BOX filter while the short side is >= 2x the target (cheap and
    alias-free), BICUBIC-resize so the short side equals ``image_size``, then take the centre square."""
    img = pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    ratio = image_size / min(img.size)
    img = img.resize((round(img.width * ratio), round(img.height * ratio)), resample=Image.Resampling.BICUBIC)
    left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


class ImageFolderSource(Dataset):
    """``root/<class>/<image>`` (torchvision ``ImageFolder``) with MAR's centre crop, random horizontal flip
    (``flip=True``; uses the global torch RNG, so DataLoader worker seeding applies) and [-1, 1] scaling."""

    def __init__(self, root: str | Path, image_size: int, flip: bool = True):
        from torchvision.datasets import ImageFolder  # lazy: the emoji and latent paths never need torchvision

        root = Path(root)
        if not str(root) or not root.is_dir():
            raise FileNotFoundError(f"image folder root {str(root)!r} does not exist or is not a directory")
        try:
            self.folder = ImageFolder(str(root))
        except FileNotFoundError as err:  # torchvision's wording for "no class folders" / "no images"
            raise ValueError(f"image folder {root} is empty (expected root/<class>/<image files>): {err}") from err
        self.root, self.image_size, self.flip = root, int(image_size), flip

    @property
    def num_classes(self) -> int:
        return len(self.folder.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.folder.classes)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.folder.targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.folder[i]  # the default loader already converts to RGB
        image = center_crop_arr(image, self.image_size)
        if self.flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # ToTensor + Normalize(0.5, 0.5), written out so the dataset pickles for DataLoader workers.
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return x.float() / 127.5 - 1.0, int(label)


# ---- Cached latents -------------------------------------------------------------------------------------------
@torch.no_grad()
def cache_latents(vae: torch.nn.Module, dataset: Dataset, path: str | Path, batch_size: int = 64,
                  device: str | torch.device = "cpu") -> Path:
    """Encode every image and its horizontal flip; save posterior ``moments`` [N, 2, 2C, h, w] (index 0 = image,
    1 = flip) and ``labels`` [N] to a safetensors file, atomically. Storing moments rather than samples keeps
    the VAE's noise a training-time choice, as MAR's ``--use_cached`` path does. The dataset must be
    deterministic (no random flip): both orientations are stored here and picked at random when read."""
    if getattr(dataset, "flip", False):
        raise ValueError("cache_latents needs a dataset without random flips (e.g. ImageFolderSource(..., "
                         "flip=False)); it stores each image and its mirror itself")
    if len(dataset) == 0:
        raise ValueError("cache_latents: the dataset is empty")
    path = Path(path)
    was_training = vae.training
    vae.eval().to(device)
    moments, labels = [], []
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        for images, y in tqdm(loader, desc=f"caching latents -> {path.name}", unit="batch"):
            images = images.to(device=device, dtype=torch.float32)
            pair = torch.stack([vae.encode(images).moments, vae.encode(images.flip(-1)).moments], dim=1)
            moments.append(pair.float().cpu())
            labels.append(torch.as_tensor(y, dtype=torch.int64).cpu())
    finally:
        vae.train(was_training)
    tensors = {"moments": torch.cat(moments).contiguous(), "labels": torch.cat(labels).contiguous()}
    config = getattr(vae, "config", None)
    meta = {
        "format": LATENT_FORMAT,
        "vae_config": strict_json.dumps(config.to_dict() if hasattr(config, "to_dict") else {}),
        "image_size": str(int(getattr(dataset, "image_size", 0) or tensors["moments"].shape[-1] * _stride(vae))),
        "num_classes": str(int(getattr(dataset, "num_classes", int(tensors["labels"].max()) + 1))),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def _stride(vae: torch.nn.Module) -> int:
    return int(getattr(getattr(vae, "config", None), "stride", 1))


class CachedLatentSource(Dataset):
    """Reads a :func:`cache_latents` file; each access returns the image's or the flip's moments at random
    (``generator``, or the global torch RNG when None) -- MAR's cached-latent augmentation."""

    def __init__(self, path: str | Path, generator: Optional[torch.Generator] = None):
        path = Path(path)
        if not str(path) or not path.is_file():
            raise FileNotFoundError(f"latent cache {str(path)!r} does not exist (write one with cache_latents)")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                keys = set(fh.keys())
                if not {"moments", "labels"} <= keys:
                    raise ValueError(f"{path} is not a latent cache: expected tensors 'moments' and 'labels', "
                                     f"found {sorted(keys)}")
                self.moments = fh.get_tensor("moments")
                self.labels = fh.get_tensor("labels").to(torch.int64)
        except ValueError:
            raise
        except Exception as err:  # not a safetensors file at all
            raise ValueError(f"{path} is not a readable safetensors latent cache: {err}") from err
        m, n = self.moments, self.labels.numel()
        if m.dim() != 5 or m.shape[1] != 2 or m.shape[2] % 2 or self.labels.dim() != 1 or m.shape[0] != n:
            raise ValueError(f"{path}: expected moments [N, 2, 2C, h, w] and labels [N], got "
                             f"{tuple(m.shape)} and {tuple(self.labels.shape)}")
        self.path, self.generator = path, generator
        self.vae_config = json.loads(meta.get("vae_config", "{}"))
        self.image_size = int(meta["image_size"]) if "image_size" in meta else None
        stored = meta.get("num_classes")
        self.num_classes = int(stored) if stored else (int(self.labels.max()) + 1 if n else 0)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        which = int(torch.randint(2, (1,), generator=self.generator))
        return self.moments[i, which], int(self.labels[i])


# ---- Dispatcher -----------------------------------------------------------------------------------------------
def build_source(data: "DataSection", split: str = "train", per_class: Optional[int] = None) -> Dataset:
    """The dataset a recipe's ``data:`` section describes.

    * ``emoji``: :class:`EmojiDataset` (``per_class`` overrides ``data.per_class``, e.g. for a test split);
    * ``imagefolder``: ``root/<split>`` if that folder exists, else ``root`` itself; random flips for train only;
    * ``latents``: the :func:`cache_latents` file at ``root`` (one file; ``split`` is not used).
    """
    source = data.source
    if source == "emoji":
        ds: Dataset = EmojiDataset(split, image_size=data.image_size,
                                   per_class=data.per_class if per_class is None else per_class,
                                   seed=data.seed, augment=data.augment,
                                   classes=[int(c) for c in data.classes] or None)
    elif source == "imagefolder":
        if not data.root:
            raise ValueError("data.source=imagefolder needs data.root (the folder of class sub-folders)")
        root = Path(data.root)
        ds = ImageFolderSource(root / split if (root / split).is_dir() else root, data.image_size,
                               flip=(split == "train"))
    elif source == "latents":
        if not data.root:
            raise ValueError("data.source=latents needs data.root (the file written by cache_latents)")
        ds = CachedLatentSource(data.root)
    else:
        raise ValueError(f"unknown data.source {source!r}; valid values: {', '.join(SOURCES)}")
    if len(ds) == 0:
        raise ValueError(f"data source {source!r} ({data.root or split}) is empty")
    return ds
