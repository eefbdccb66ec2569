"""PickScore (Kirstain et al. 2023): a CLIP-H/14 fine-tuned on human preferences (Pick-a-Pic).

Its reference usage scores ``logit_scale.exp() * cos(image, prompt)`` with a transformers ``CLIPModel``
(``yuvalkirstain/PickScore_v1``) and the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
(resize shortest edge to 224, bicubic, centre crop 224, OpenAI CLIP mean/std; text padded and truncated to
77 tokens). Here both come from local folders: ``path`` is the model folder (config.json + weights) and
``processor`` the folder with ``preprocessor_config.json`` and the tokenizer files (default: ``path``;
the PickScore_v1 folder carries its own copies). Either may instead be a hub id or a name from
``marval-rl download --list`` whose snapshot is in the local Hugging Face cache (offline):
``path="pickscore"`` (``yuvalkirstain/PickScore_v1``), ``processor="pickscore_processor"``
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); docs/weights.md. The score is typically around 20-23 for relevant pairs;
differences between images for the same prompt are what matter.
"""
from __future__ import annotations

from .clip_score import HFCLIPScore

__all__ = ["PickScore"]


class PickScore(HFCLIPScore):
    """kwargs: ``path`` (PickScore_v1 folder, or ``pickscore`` / ``yuvalkirstain/PickScore_v1`` from the HF cache),
    ``processor`` (processor folder or hub id; default ``path``), ``precision``,
    ``device``, ``batch_size``, ``random_init`` (architecture from ``path/config.json``, random weights)."""

    name = "pickscore"

    def __init__(self, path: str | None = None, processor: str | None = None, precision: str = "fp32",
                 device: str = "cpu", batch_size: int | None = None, random_init: bool = False):
        super().__init__(path=path, processor=processor, use_logit_scale=True, precision=precision,
                         device=device, batch_size=batch_size, random_init=random_init)
