"""The reward interface: ``RewardModel`` (validation around a subclass's ``score``) and torch preprocessing.

Conventions shared by every reward:

* ``images``: float tensor ``[B, 3, H, W]`` with values in ``[0, 1]`` (a tolerance of 1e-3 absorbs decoder
  round-off), possibly requiring grad. Any resolution: each reward resizes to its model's input size itself.
* ``prompts``: ``list[str]`` of length B (text rewards require it; others ignore it).
* ``metadata``: dict, e.g. ``{"class_ids": LongTensor[B]}`` (class ids of the generator's label space; for the
  embedded emoji generator, the 56 emoji classes).
* output: float tensor ``[B]`` (higher is better), on the device the images came from.

Preprocessing (resize with antialias, centre crop, normalise) is done in torch, so a reward declared
``differentiable`` passes gradients back to the pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from marval_rl.models.preprocess import normalize, resize_center_crop

__all__ = ["RewardError", "RewardModel", "RewardFile", "resize_center_crop", "normalize", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANGE_TOLERANCE = 1e-3


class RewardError(ValueError):
    """A reward that cannot be built, or inputs / outputs a reward cannot accept."""


@dataclass(frozen=True)
class RewardFile:
    """A file or folder a reward reads, as its kwargs name it (``marval-rl validate`` checks it is there).

    ``spec`` is what the recipe gives: a local path, or a table name / hub id that ``marval_rl.hub.resolve``
    finds in the local Hugging Face cache, where ``filename`` is the file the reward asks the repo for
    (None: the repo's folder). ``kind``: "file" or "dir"."""
    kwarg: str
    spec: str
    kind: str = "file"
    filename: str | tuple[str, ...] | None = None


class RewardModel(nn.Module):
    """Base class of every reward. Subclasses set the class attributes and implement :meth:`score`.

    ``__call__`` validates the inputs, moves the images to the reward's device, runs ``score`` (under
    ``no_grad`` unless the reward is differentiable), and validates the output. Rewards are frozen scorers:
    their parameters do not require grad and they stay in eval mode even if a parent calls ``.train()``
    (set ``frozen = False`` in a subclass that is meant to be trained).
    """

    name: str = "reward"
    differentiable: bool = False   # d reward / d images is meaningful (no PIL, argmax, ... in the path)
    set_level: bool = False        # True: a sample's value depends on the whole batch (FID-proxy)
    requires_prompts: bool = False
    requires_class_ids: bool = False
    frozen: bool = True

    # ------------------------------------------------------------------ subclass API
    def score(self, images: torch.Tensor, prompts: list[str] | None, metadata: dict) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the reward is, for logs and docs."""
        return {"name": self.name, "class": f"{type(self).__module__}:{type(self).__qualname__}",
                "differentiable": self.differentiable, "set_level": self.set_level,
                "requires_prompts": self.requires_prompts, "requires_class_ids": self.requires_class_ids}

    @classmethod
    def required_files(cls, kwargs: dict) -> list[RewardFile]:
        """The files a reward built with ``kwargs`` reads, checked before anything loads; a reward that
        reads files overrides this with the same defaults its ``__init__`` uses (none here)."""
        return []

    # ------------------------------------------------------------------ helpers
    def freeze(self) -> "RewardModel":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        if self.frozen:
            mode = False
        return super().train(mode)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def _error(self, message: str) -> RewardError:
        return RewardError(f"reward '{self.name}': {message}")

    # ------------------------------------------------------------------ validation
    def check_images(self, images: Any) -> None:
        if not isinstance(images, torch.Tensor):
            raise self._error(f"images must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise self._error(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise self._error(f"images must be float in [0, 1], got dtype {images.dtype} "
                              f"(convert uint8 with images.float() / 255)")
        if images.shape[0] == 0:
            raise self._error("empty batch (B = 0)")
        if images.shape[2] == 0 or images.shape[3] == 0:
            raise self._error(f"images have an empty spatial size {tuple(images.shape[2:])}")
        if images.device.type == "meta":
            return
        x = images.detach()
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n = int(bad.flatten(1).any(1).sum())
            raise self._error(f"images contain NaN/Inf in {n} of {x.shape[0]} images")
        lo, hi = torch.aminmax(x)
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise self._error(f"images must be in [0, 1], got values in [{lo.item():.4g}, {hi.item():.4g}] "
                              f"(images in [-1, 1] need (x + 1) / 2)")

    def check_prompts(self, prompts: Any, batch: int) -> list[str] | None:
        if prompts is None:
            if self.requires_prompts:
                raise self._error(f"needs prompts (a list of {batch} strings), got None")
            return None
        if isinstance(prompts, str):
            raise self._error("prompts must be a list of strings, one per image, got a single str")
        if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise self._error(f"prompts must be a list of str, got {type(prompts).__name__}")
        prompts = list(prompts)
        if len(prompts) != batch:
            raise self._error(f"got {len(prompts)} prompts for {batch} images (len(prompts) must equal B)")
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty and self.requires_prompts:
            raise self._error(f"empty prompt string at index {empty[:8]}")
        return prompts

    def check_metadata(self, metadata: Any, batch: int) -> dict:
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise self._error(f"metadata must be a dict, got {type(metadata).__name__}")
        if self.requires_class_ids:
            ids = metadata.get("class_ids")
            if ids is None:
                raise self._error("needs metadata['class_ids'] (a LongTensor [B] of class ids)")
            ids = torch.as_tensor(ids)
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1 or len(ids) != batch:
                raise self._error(f"metadata['class_ids'] must be an integer tensor of shape [{batch}], got "
                                  f"{ids.dtype} {tuple(ids.shape)}")
            metadata = {**metadata, "class_ids": ids.long()}
        return metadata

    def check_output(self, out: Any, batch: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise self._error(f"score() must return a tensor [B], got {type(out).__name__}")
        if out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if tuple(out.shape) != (batch,):
            raise self._error(f"returned shape {tuple(out.shape)}, expected [{batch}]")
        if not out.is_floating_point():
            out = out.float()
        if out.device.type != "meta":
            nan = torch.isnan(out.detach())
            inf = torch.isinf(out.detach())
            if bool(nan.any()):
                raise self._error_returned("NaN", int(nan.sum()), batch)
            if bool(inf.any()):
                raise self._error_returned("Inf", int(inf.sum()), batch)
        return out

    def _error_returned(self, what: str, n: int, batch: int) -> RewardError:
        return RewardError(f"reward '{self.name}' returned {what} for {n} of {batch} images")

    # ------------------------------------------------------------------ call
    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None,
                 metadata: dict | None = None) -> torch.Tensor:
        self.check_images(images)
        batch = images.shape[0]
        prompts = self.check_prompts(prompts, batch)
        metadata = self.check_metadata(metadata, batch)
        device = self.device
        x = images.to(device) if images.device != device else images
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            out = super().__call__(x, prompts, metadata)
        out = self.check_output(out, batch)
        return out.to(images.device) if out.device != images.device else out

    def forward(self, images, prompts=None, metadata=None):  # nn.Module hooks run around this
        return self.score(images, prompts, metadata if metadata is not None else {})

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}, set_level={self.set_level}"


# preprocessing lives with the evaluator networks (models/preprocess.py); re-exported here for rewards


def interpolation_name(value: Any) -> str:
    """Map PIL resample ints / names (HF ``resample``, open_clip ``interpolation``) to torch modes."""
    if isinstance(value, str):
        v = value.lower()
        return {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "lanczos": "bicubic"}.get(v, "bicubic")
    return {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "bicubic", 4: "bilinear", 5: "bicubic"}.get(int(value), "bicubic")


class PromptCache:
    """prompt -> text embedding (no grad), bounded; each prompt's value independent of history.

    A text encoder's output for one prompt depends, in its last bits, on the batch it was encoded in
    (batch sizes pick different matrix kernels: rows of a batch of 1-2 and of 3+ differ by ~1e-7). A
    cache filled from whatever batches arrived first would make a reward depend on the order of
    earlier calls, so a resumed run (empty cache) or another worker count scores differently. Each
    new prompt is therefore encoded alone: its embedding is a function of the prompt only."""

    def __init__(self, encode, max_size: int = 8192):
        self.encode, self.max_size, self.store = encode, max_size, {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.store]
        if len(self.store) + len(new) > self.max_size:
            self.store.clear()
        for p in new:
            self.store[p] = self.encode([p])[0]
        return torch.stack([self.store[p] for p in prompts])


def chunks(n: int, size: int):
    for i in range(0, n, max(1, size)):
        yield slice(i, min(n, i + size))


def finite_or_raise(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise RewardError(f"{what} contains NaN/Inf")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def is_integer(x) -> bool:
    return isinstance(x, int) or (isinstance(x, float) and math.isfinite(x) and x == int(x))
