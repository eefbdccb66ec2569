"""The embedded CLIP: open_clip's ``CLIP`` architecture at a tiny size, for emoji-56 renders.

What it is: an open_clip ``CLIP`` (image tower: open_clip's ``ModifiedResNet`` by default, any open_clip
vision config works; text tower: open_clip's ``TextTransformer``), trained contrastively by
``marval-rl pretrain`` stage ``clip`` (pretrain/clip.py) on rendered emoji with the project's prompt
templates. It is **not** OpenAI's CLIP: it knows the 56 emoji classes and the template words, nothing else.
The reward built on it is rewards/embedded_clip.py; its zero-shot evaluation is eval/zero_shot.py.

Tokenizer: open_clip's BPE ``SimpleTokenizer`` (bundled, offline), followed by a lookup that keeps only the
BPE ids seen in the training prompts (``config.vocab``); any other BPE token becomes ``<unk>``. This keeps
the token-embedding table (49,408 rows in open_clip) down to a few hundred rows, so the checkpoint stays
small. Text pooling is at the end-of-text token (open_clip ``pool_type="eos"``).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from marval_rl.models.architectures import register_architecture
from marval_rl.models.preprocess import normalize, resize_center_crop

PAD, UNK = 0, 1


@dataclass
class EmbeddedCLIPConfig:
    embed_dim: int = 128
    # open_clip CLIPVisionCfg fields; ``layers`` as a list selects open_clip's ModifiedResNet.
    vision: dict = field(default_factory=lambda: {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16,
                                                  "head_width": 32})
    # open_clip CLIPTextCfg fields (vocab_size / pool_type / eos_id are set from ``vocab``).
    text: dict = field(default_factory=lambda: {"context_length": 16, "width": 64, "heads": 2, "layers": 2})
    vocab: list = field(default_factory=list)   # kept BPE ids, sorted; compact id = 2 + position
    mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EmbeddedCLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EmbeddedCLIPConfig key(s) {unknown}; valid keys: {sorted(known)}")
        base = cls()
        d = dict(d)
        for k in ("vision", "text"):  # partial overrides merge into the defaults
            if k in d:
                d[k] = {**getattr(base, k), **dict(d[k])}
        return cls(**d)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2

    @property
    def image_size(self) -> int:
        s = self.vision.get("image_size", 32)
        return int(s if isinstance(s, int) else s[0])


@functools.lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def build_vocab(texts: Sequence[str]) -> list[int]:
    """Sorted BPE ids used by ``texts`` plus start/end of text."""
    tok = _bpe()
    ids = {tok.sot_token_id, tok.eot_token_id}
    for t in texts:
        ids.update(tok.encode(t))
    return sorted(ids)


def _non_persistent_buffers(model: nn.Module):
    for mod_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                yield (f"{mod_name}.{name}" if mod_name else name), module._buffers[name]


@register_architecture("clip")
class EmbeddedCLIP(nn.Module):
    """open_clip ``CLIP`` + compact-vocabulary tokenizer + [0, 1]-image preprocessing."""

    config_class = EmbeddedCLIPConfig

    def __init__(self, config: EmbeddedCLIPConfig | dict | None = None):
        super().__init__()
        from open_clip.model import CLIP

        if config is None:
            config = EmbeddedCLIPConfig()
        elif isinstance(config, dict):
            config = EmbeddedCLIPConfig.from_dict(config)
        if not config.vocab:
            raise ValueError("EmbeddedCLIPConfig.vocab is empty: build it with build_vocab(training prompts)")
        if config.vocab != sorted(set(config.vocab)):
            raise ValueError("EmbeddedCLIPConfig.vocab must be sorted and unique")
        self.config = config
        eos = config.vocab.index(_bpe().eot_token_id) + 2
        text_cfg = {**config.text, "vocab_size": config.vocab_size, "pool_type": "eos", "eos_id": eos,
                    "pad_id": PAD}
        self.clip = CLIP(embed_dim=config.embed_dim, vision_cfg=dict(config.vision), text_cfg=text_cfg)
        lut = torch.full((len(_bpe().encoder),), UNK, dtype=torch.long)  # BPE id -> compact id
        lut[0] = PAD
        lut[torch.tensor(config.vocab)] = torch.arange(len(config.vocab)) + 2
        self.register_buffer("lut", lut, persistent=False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also restores the non-persistent buffers (token lookup table, causal mask): ``load_pretrained``
        builds the model on the meta device and ``to_empty`` leaves those uninitialised."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        with torch.device("cpu"):
            fresh = dict(_non_persistent_buffers(EmbeddedCLIP(self.config)))
        own = dict(_non_persistent_buffers(self))
        for qual, value in fresh.items():
            mod_name, _, buf = qual.rpartition(".")
            module = self.get_submodule(mod_name) if mod_name else self
            module._buffers[buf] = value.to(own[qual].device) if qual in own else value
        return result

    @property
    def context_length(self) -> int:
        return int(self.config.text.get("context_length", 16))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        bpe = _bpe()(list(texts), context_length=self.context_length)
        return self.lut.to(bpe.device)[bpe]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        x = resize_center_crop(images, s, crop=s, mode="bilinear")
        return normalize(x, self.config.mean, self.config.std)

    def encode_image(self, images: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        f = self.clip.encode_image(self.preprocess(images))
        return F.normalize(f, dim=-1) if normalized else f

    def encode_text(self, texts: Sequence[str], normalized: bool = True) -> torch.Tensor:
        tokens = self.tokenize(texts).to(self.clip.logit_scale.device)
        f = self.clip.encode_text(tokens)
        return F.normalize(f, dim=-1) if normalized else f

    def forward(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image with its text, [B]."""
        return (self.encode_image(images) * self.encode_text(texts)).sum(-1)
