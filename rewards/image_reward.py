"""ImageReward (Xu et al. 2023) rebuilt on transformers' BLIP modules, loading the official ``ImageReward.pt``.

The ``image-reward`` package itself cannot be a dependency (it pins timm 0.6.13 and needs transformers < 4.56),
so the same network is assembled from transformers classes:

* image: ``BlipVisionModel`` (ViT-L/16 at 224 px in the official model); its full token sequence after
  ``post_layernorm`` is the cross-attention memory;
* text: ``BlipTextModel`` (BERT-base with cross-attention, ``add_pooling_layer=False``) run in encoder mode
  (``is_decoder=False``) on the prompt; the ``[CLS]`` output feeds
* ``mlp``: Linear(768, 1024) - Dropout - Linear(1024, 128) - Dropout - Linear(128, 64) - Dropout -
  Linear(64, 16) - Linear(16, 1), no activations; reward = (mlp(cls) - 0.16717362830052426) / 1.0333394966054072.

Checkpoint keys map one to one (:func:`map_checkpoint`): ``blip.visual_encoder.*`` -> ``vision.*`` (renamed),
``blip.text_encoder.*`` -> ``text.*``, ``mlp.*`` -> ``mlp.*``. Keys not used for scoring (the ITC projections
``blip.vision_proj`` / ``blip.text_proj`` and the ``position_ids`` buffer) are dropped and reported; any
other unmapped or missing key is an error (``strict=True``). The checkpoint is read with
``torch.load(weights_only=True)``.

Tokenizer: BERT uncased WordPiece from a local ``vocab.txt`` (bert-base-uncased's, 30,522 lines), plus
``[DEC]`` (bos) and ``[ENC]``, padded / truncated to 35 tokens. Preprocessing: resize shortest side to 224
(bicubic), centre crop, OpenAI CLIP mean / std, done in torch.

Parity with the original package is tested against golden data produced by image-reward 1.5 on a small
random configuration (``tests/fixtures/image_reward_golden``).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marval_rl.hub import WEIGHTS, HubError, fetch_hint, parse_hub_id, resolve
from marval_rl.models.checkpoints import CheckpointError, torch_load_safely

from .base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RewardError, RewardFile, RewardModel, chunks, normalize,
                   resize_center_crop)

__all__ = ["ImageReward", "ImageRewardNet", "map_checkpoint", "vision_config_from_checkpoint", "MEAN", "STD"]

MEAN, STD = 0.16717362830052426, 1.0333394966054072
DROPPED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
DROPPED_KEYS = ("blip.text_encoder.embeddings.position_ids",)

_VISION_RENAMES = [
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision.embeddings.patch_embedding.\1"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)$", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)$", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$",
     r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (r"^blip\.visual_encoder\.norm\.(weight|bias)$", r"vision.post_layernorm.\1"),
    (r"^blip\.text_encoder\.(.+)$", r"text.\1"),
    (r"^mlp\.(.+)$", r"mlp.\1"),
]
_RENAMES = [(re.compile(a), b) for a, b in _VISION_RENAMES]


def map_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """ImageReward checkpoint keys -> :class:`ImageRewardNet` keys. Returns (mapped, dropped, unmapped)."""
    mapped, dropped, unmapped = {}, [], []
    for key, value in state_dict.items():
        if key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES):
            dropped.append(key)
            continue
        for pattern, repl in _RENAMES:
            if pattern.match(key):
                mapped[pattern.sub(repl, key)] = value
                break
        else:
            unmapped.append(key)
    return mapped, dropped, unmapped


def vision_config_from_checkpoint(sd: dict[str, torch.Tensor], heads: int | None = None) -> dict[str, Any]:
    """BlipVisionConfig arguments implied by the tensor shapes of an ImageReward checkpoint."""
    try:
        hidden = sd["blip.visual_encoder.cls_token"].shape[-1]
        patch = sd["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
        positions = sd["blip.visual_encoder.pos_embed"].shape[1]
        inter = sd["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise RewardError(f"image_reward: checkpoint lacks {e} (is it an ImageReward checkpoint?)") from None
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k)))
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise RewardError(f"image_reward: pos_embed has {positions} positions, not 1 + a square grid")
    if heads is None:
        if hidden % 64:
            raise RewardError(f"image_reward: cannot infer the vision heads for width {hidden}; pass vision_heads=")
        heads = hidden // 64
    return {"hidden_size": int(hidden), "intermediate_size": int(inter), "num_hidden_layers": int(layers),
            "num_attention_heads": int(heads), "image_size": int(grid * patch), "patch_size": int(patch),
            "layer_norm_eps": 1e-6, "hidden_act": "gelu"}


def text_config_from_med(med: dict, encoder_width: int, tokenizer=None) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    missing = [k for k in keys if k not in med]
    if missing:
        raise RewardError(f"image_reward: med_config lacks {missing}")
    cfg = {k: med[k] for k in keys}
    # ImageReward overrides encoder_width with its ViT width; is_decoder=True builds the cross-attention layers.
    cfg.update(encoder_hidden_size=int(encoder_width), is_decoder=True, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    if tokenizer is not None:  # special ids of *this* vocabulary (only generation uses them)
        cfg.update(bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), sep_token_id=tokenizer.sep_token_id,
                   eos_token_id=tokenizer.sep_token_id)
    return cfg


class ImageRewardNet(nn.Module):
    """vision + text (cross-attending) + MLP head; ``forward(pixel_values, input_ids, attention_mask)``."""

    def __init__(self, vision_config: dict, text_config: dict):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(BlipVisionConfig(**vision_config))
        self.text = BlipTextModel(BlipTextConfig(**text_config), add_pooling_layer=False)
        h = text_config["hidden_size"]
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(nn.Linear(h, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def cls_features(self, pixel_values, input_ids, attention_mask):
        img = self.vision(pixel_values=pixel_values).last_hidden_state
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                        is_decoder=False)
        return out.last_hidden_state[:, 0]

    def forward(self, pixel_values, input_ids, attention_mask):
        cls = self.cls_features(pixel_values, input_ids, attention_mask)
        return (self.mlp.layers(cls)[:, 0].float() - MEAN) / STD


# the file each argument names inside a repo when given a hub id / table name without a file
_HUB_FILES = {"checkpoint": "ImageReward.pt", "med_config": "med_config.json", "vocab": "vocab.txt"}


def _file(path, what: str) -> Path:
    """A local file, or a table name / hub id (``image_reward``, ``THUDM/ImageReward``) from the local HF cache."""
    if not path:
        raise RewardError(f"image_reward: needs {what}=<local file, or a name / hub id in the HF cache>")
    try:
        p = Path(resolve(path, _HUB_FILES[what])).expanduser()
    except HubError as e:
        raise RewardError(f"image_reward: {e}") from None
    if not p.is_file():
        raise RewardError(f"image_reward: {what} file not found: {p}{fetch_hint(path)}")
    return p


def _repo_of(spec) -> str | None:
    """The table name or ``org/repo[@rev]`` a checkpoint spec names (not a path on disk), else None:
    med_config then defaults to the same repo's med_config.json."""
    if not spec or Path(str(spec)).expanduser().exists():
        return None
    if str(spec) in WEIGHTS:
        return str(spec)
    parsed = parse_hub_id(str(spec))
    return None if parsed is None else parsed[0] + (f"@{parsed[1]}" if parsed[1] else "")


def build_tokenizer(vocab: str | Path):
    from transformers import BertTokenizer

    tok = BertTokenizer(str(vocab), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward(RewardModel):
    """ImageReward on transformers BLIP, from local files (or the local Hugging Face cache).

    kwargs: ``checkpoint`` (ImageReward.pt), ``med_config`` (med_config.json), ``vocab`` (a BERT uncased
    vocab.txt); each a local file or a table name / hub id in the local HF cache (``checkpoint="image_reward"``
    or ``"THUDM/ImageReward"``, ``vocab="bert_base_uncased"``; ``med_config`` then defaults to the checkpoint's
    repo), ``vision_heads`` (only for non-standard widths), ``image_size`` (preprocessing size; default
    the checkpoint's), ``random_init`` (build the official architecture with random weights, no checkpoint;
    benchmarks), ``precision``, ``device``, ``batch_size``.
    After loading, ``self.load_report`` lists the dropped checkpoint keys.
    """

    name = "image_reward"
    differentiable = True
    requires_prompts = True

    @classmethod
    def required_files(cls, kwargs):
        """As __init__ resolves them: med_config defaults to the checkpoint's repo, a file each (_HUB_FILES)."""
        checkpoint, med_config = kwargs.get("checkpoint"), kwargs.get("med_config")
        if med_config is None and _repo_of(checkpoint):
            med_config = _repo_of(checkpoint)
        specs = {"checkpoint": None if kwargs.get("random_init") else checkpoint, "med_config": med_config,
                 "vocab": kwargs.get("vocab")}
        return [RewardFile(k, str(v), filename=_HUB_FILES[k]) for k, v in specs.items() if v]

    def __init__(self, checkpoint: str | None = None, med_config: str | None = None, vocab: str | None = None,
                 vision_heads: int | None = None, image_size: int | None = None, random_init: bool = False,
                 precision: str = "fp32", device: str = "cpu", batch_size: int | None = None, max_length: int = 35):
        super().__init__()
        from .clip_score import _dtype

        if med_config is None and _repo_of(checkpoint):
            med_config = _repo_of(checkpoint)  # the same repo holds ImageReward.pt and med_config.json
        med_path, vocab_path = _file(med_config, "med_config"), _file(vocab, "vocab")
        try:
            med = json.loads(med_path.read_text())
        except json.JSONDecodeError as e:
            raise RewardError(f"image_reward: {med_path} is not valid JSON: {e}") from e
        self.tokenizer = build_tokenizer(vocab_path)
        if len(self.tokenizer) != med.get("vocab_size"):
            raise RewardError(f"image_reward: the tokenizer from {vocab_path} has {len(self.tokenizer)} tokens "
                              f"(with [DEC], [ENC]) but med_config vocab_size is {med.get('vocab_size')}: wrong vocab "
                              f"file? ImageReward uses bert-base-uncased's vocab.txt (30,522 lines)")
        if random_init:
            if checkpoint:
                raise RewardError("image_reward: give checkpoint= or random_init=True, not both")
            vcfg = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                    "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
            sd = None
        else:
            ckpt_path = _file(checkpoint, "checkpoint")
            try:
                sd = torch_load_safely(ckpt_path)
            except CheckpointError as e:
                raise RewardError(f"image_reward: {e}") from e
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict):
                raise RewardError(f"image_reward: {ckpt_path} holds no state dict")
            vcfg = vision_config_from_checkpoint(sd, vision_heads)
        tcfg = text_config_from_med(med, vcfg["hidden_size"], self.tokenizer)
        self.net = ImageRewardNet(vcfg, tcfg)
        self.load_report: dict[str, list[str]] = {"dropped": [], "unmapped": [], "missing": []}
        if sd is not None:
            mapped, dropped, unmapped = map_checkpoint(sd)
            own = self.net.state_dict()
            missing = [k for k in own if k not in mapped]
            mismatched = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                          if k in mapped and mapped[k].shape != v.shape]
            self.load_report = {"dropped": dropped, "unmapped": unmapped, "missing": missing}
            if unmapped or missing or mismatched:
                raise RewardError(f"image_reward: {checkpoint} does not fit ImageReward: unmapped checkpoint keys "
                                  f"{unmapped[:10]} ({len(unmapped)}), missing model keys {missing[:10]} "
                                  f"({len(missing)}), shape mismatches {mismatched[:10]}")
            self.net.load_state_dict(mapped, strict=True)
        self.net.to(device=device, dtype=_dtype(precision))
        self.image_size = int(image_size or vcfg["image_size"])
        self.batch_size, self.max_length = batch_size, int(max_length)
        self.freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize(224, bicubic) -> CenterCrop(224) -> Normalize(CLIP mean/std), in torch."""
        x = resize_center_crop(images, self.image_size, crop=self.image_size, mode="bicubic")
        return normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def score(self, images, prompts, metadata):
        ids, mask = self.tokenize(prompts)
        outs = []
        for sl in chunks(len(images), self.batch_size or len(images)):
            x = self.preprocess(images[sl]).to(self.dtype)
            outs.append(self.net(x, ids[sl], mask[sl]))
        return torch.cat(outs).float()
