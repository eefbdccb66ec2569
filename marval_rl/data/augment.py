"""On-the-fly augmentation of training batches (the renders themselves are fixed per seed).

One rule for every trainer that wants it (the embedded classifier and the embedded CLIP): a random
horizontal flip and a random shift of up to ``max_shift`` pixels (replicate padding), drawn per image
from the run's generator, so a resumed run draws the same. Both stay within the "full" render preset's
own distribution; they multiply the variety seen at ~no cost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def flip_and_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """``images`` [B, C, H, W], each flipped with probability 1/2 and shifted by its own (dx, dy)."""
    b, _, h, w = images.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if max_shift <= 0:
        return x
    pad = F.pad(x, [max_shift] * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
