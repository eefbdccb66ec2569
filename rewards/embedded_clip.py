"""The embedded-CLIP reward: ``scale * cos(image, prompt)`` with the emoji-trained CLIP (models/embedded_clip.py).

It loads ``marval_rl/assets/embedded/clip`` unless ``path`` says otherwise; stage ``clip`` of
``marval-rl pretrain`` (pretrain/clip.py) trains a new one.
"""
from __future__ import annotations

from pathlib import Path

from marval_rl.config import asset_path
from marval_rl.models.checkpoints import CheckpointError, load_pretrained

from .base import PromptCache, RewardError, RewardFile, RewardModel

__all__ = ["EmbeddedCLIPScore", "default_clip_path"]


def default_clip_path() -> str:
    return asset_path("embedded/clip")


class EmbeddedCLIPScore(RewardModel):
    """CLIP score with the embedded (emoji-trained) CLIP: ``scale * cos(image, prompt)``.

    kwargs: ``path`` (a directory written by ``marval-rl pretrain`` stage ``clip``; default the shipped one),
    ``scale`` (1.0; CLIPScore-style reporting uses 100), ``device``.
    """

    name = "embedded_clip"
    differentiable = True
    requires_prompts = True

    @classmethod
    def required_files(cls, kwargs):
        return [RewardFile("path", str(kwargs.get("path") or default_clip_path()), kind="dir")]

    def __init__(self, path: str | None = None, scale: float = 1.0, device: str = "cpu"):
        super().__init__()
        path = Path(path or default_clip_path())
        if not (path / "config.json").is_file():
            raise RewardError(f"embedded CLIP checkpoint not found: {path} (expected config.json + model.safetensors; "
                              f"train one with `marval-rl pretrain recipes/pretrain_clip.yaml`)")
        try:
            self.model = load_pretrained(path, expected="clip", map_location=device)
        except CheckpointError as e:
            raise RewardError(str(e)) from e
        self.scale = float(scale)
        self.path = str(path)
        self.text_features = PromptCache(self.model.encode_text, max_size=4096)
        self.freeze()

    def score(self, images, prompts, metadata):
        img = self.model.encode_image(images.to(self.dtype))
        return self.scale * (img.float() * self.text_features(prompts).to(img.device).float()).sum(-1)
