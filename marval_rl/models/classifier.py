"""The embedded emoji-56 classifier: a ~120k-parameter CNN, the network behind the classifier reward and
the FID-proxy feature net (trained by pretrain/classifier.py, evaluated by eval/classifier.py).

Convention (shared by every evaluator and reward in the project): inputs are float images
``[B, 3, H, W]`` in **[0, 1]**. Resizing to the training resolution and normalisation happen
inside, so callers pass generator outputs as they are, and gradients flow back to the pixels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from marval_rl.models.architectures import register_architecture
from marval_rl.models.preprocess import check_images


@dataclass
class ClassifierConfig:
    num_classes: int = 56
    image_size: int = 32
    widths: tuple = (32, 64, 128)
    feature_dim: int = 128

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)  # JSON has no tuples
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ClassifierConfig key(s) {unknown}; valid keys: {sorted(known)}")
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(int(w) for w in d["widths"])
        return cls(**d)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


@register_architecture("classifier")
class EmojiClassifier(nn.Module):
    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = ClassifierConfig()
        elif isinstance(config, dict):
            config = ClassifierConfig.from_dict(config)
        self.config = config
        self.num_features = config.feature_dim  # torchmetrics reads this to size its FID state
        chans = [3, *config.widths]
        self.blocks = nn.Sequential(*[_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.fc = nn.Linear(chans[-1], config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        s = self.config.image_size
        if images.shape[-2:] != (s, s):
            # antialias: downscaling 256 px generator output without it aliases badly.
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        # Fixed normalisation to [-1, 1] (no data-dependent buffers: nothing to keep in sync).
        return images * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feature_dim] (the FID-proxy embedding)."""
        x = self.blocks(self._prepare(images))
        return F.relu(self.fc(x.mean(dim=(2, 3))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
