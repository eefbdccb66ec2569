"""Held-out accuracy of the embedded classifier (models/classifier.py)."""
from __future__ import annotations

import torch

from marval_rl.models.classifier import EmojiClassifier


@torch.no_grad()
def evaluate_accuracy(model: EmojiClassifier, images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 256) -> dict:
    """Top-1 accuracy and mean p(true class) with BatchNorm in eval mode. ``images``: uint8 or [0, 1]."""
    was_training = model.training
    model.eval()
    correct, p_true = 0, 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        probs = model(x).softmax(-1)
        y = labels[i:i + batch_size]
        correct += (probs.argmax(-1) == y).sum().item()
        p_true += probs.gather(1, y[:, None]).sum().item()
    model.train(was_training)
    return {"accuracy": correct / len(images), "mean_p_true": p_true / len(images), "n": len(images)}
