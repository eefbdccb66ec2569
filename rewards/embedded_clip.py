"""The embedded CLIP: open_clip's ``CLIP`` architecture at a tiny size, trained on emoji-56 renders.

What it is: an open_clip ``CLIP`` (image tower: open_clip's ``ModifiedResNet`` by default, any open_clip
vision config works; text tower: open_clip's ``TextTransformer``) trained contrastively by
:func:`train_embedded_clip` on rendered emoji with the project's prompt templates. It is **not** OpenAI's
CLIP: it knows the 56 emoji classes and the template words, nothing else.

Tokenizer: open_clip's BPE ``SimpleTokenizer`` (bundled, offline), followed by a lookup that keeps only the
BPE ids seen in the training prompts (``config.vocab``); any other BPE token becomes ``<unk>``. This keeps
the token-embedding table (49,408 rows in open_clip) down to a few hundred rows, so the checkpoint stays
small. Text pooling is at the end-of-text token (open_clip ``pool_type="eos"``).

The reward (``build_reward("embedded_clip")``) is the cosine similarity between image and prompt
embeddings, times ``scale`` (1 by default). It loads ``marval_rl/assets/embedded/clip`` unless ``path``
says otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import PromptCache, RewardError, RewardModel, normalize, resize_center_crop

__all__ = ["EmbeddedCLIPConfig", "EmbeddedCLIP", "EmbeddedCLIPScore", "train_embedded_clip",
           "zero_shot_eval", "default_clip_path"]

PAD, UNK = 0, 1


def default_clip_path() -> str:
    from marval_rl.config import asset_path

    return asset_path("embedded/clip")


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


# ---------------------------------------------------------------------- reward
class EmbeddedCLIPScore(RewardModel):
    """CLIP score with the embedded (emoji-trained) CLIP: ``scale * cos(image, prompt)``.

    kwargs: ``path`` (a directory written by :func:`train_embedded_clip`; default the shipped one),
    ``scale`` (1.0; CLIPScore-style reporting uses 100), ``device``.
    """

    name = "embedded_clip"
    differentiable = True
    requires_prompts = True

    def __init__(self, path: str | None = None, scale: float = 1.0, device: str = "cpu"):
        super().__init__()
        from marval_rl.models.checkpoints import CheckpointError, load_pretrained

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


# ---------------------------------------------------------------------- training
def _augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and small shifts on top of the fixed renders."""
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = F.pad(x, [max_shift] * 4, mode="replicate")
    h, w = x.shape[-2:]
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
    return pad[..., dy:dy + h, dx:dx + w]


def _soft_clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: every same-class pair is a positive (no false negatives)."""
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    loss_i = -(targets * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(targets.T / targets.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


@torch.no_grad()
def class_text_features(model: EmbeddedCLIP, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[len(templates), C, D] normalised text features of every (template, class) prompt."""
    from marval_rl.data.prompts import prompt

    out = []
    for t in templates:
        out.append(model.encode_text([prompt(n, t) for n in names]))
    return torch.stack(out)


@torch.no_grad()
def zero_shot_eval(model: EmbeddedCLIP, images: torch.Tensor, labels: torch.Tensor, names: Sequence[str],
                   templates: Sequence[str] | None = None, batch_size: int = 256) -> dict:
    """Zero-shot accuracy on uint8 or [0, 1] images: prompt ensemble over ``templates`` and per template."""
    from marval_rl.data.prompts import TRAIN_TEMPLATES

    was = model.training
    model.eval()
    templates = list(templates or TRAIN_TEMPLATES)
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    img = torch.cat([model.encode_image(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    txt = class_text_features(model, names, templates)                      # [T, C, D]
    ens = F.normalize(txt.mean(0), dim=-1)
    sims = img @ ens.T
    per_template = {t: float(((img @ txt[i].T).argmax(1) == labels).float().mean()) for i, t in enumerate(templates)}
    true_cos = (img * ens[labels]).sum(-1)
    other = sims.clone()
    other[torch.arange(len(labels)), labels] = float("nan")
    model.train(was)
    return {"accuracy": float((sims.argmax(1) == labels).float().mean()),
            "min_template_accuracy": min(per_template.values()),
            "per_template": per_template,
            "cos_true": float(true_cos.mean()), "cos_other": float(other.nanmean()), "n": int(len(labels))}


def train_embedded_clip(section, data, out_dir, seed: int = 0, progress: bool = True, log=print) -> dict:
    """Train the embedded CLIP on emoji-56 renders and save it (``save_pretrained``) into ``out_dir``.

    ``section``: a :class:`marval_rl.config.ClipTrainSection` (``config`` overrides
    :class:`EmbeddedCLIPConfig` fields; ``optim`` steps / batch / lr / warm-up / weight decay;
    ``test_per_class`` held-out renders per class). ``data``: a DataSection with ``source: emoji``;
    training renders always use the "full" augmentation. Each batch holds ``batch_size // 56`` images of
    every class, each paired with a prompt from a random template, and the contrastive loss uses soft
    targets over same-class pairs. Returns metrics (zero-shot accuracy on held-out renders of another
    seed stream, training time, checkpoint size, ...).
    """
    from tqdm.auto import tqdm

    from marval_rl.data.emoji import EmojiDataset
    from marval_rl.data.prompts import TRAIN_TEMPLATES, prompt
    from marval_rl.models.checkpoints import save_pretrained

    if getattr(data, "source", "emoji") != "emoji":
        raise ValueError(f"the embedded CLIP trains on data.source='emoji' renders, got {data.source!r}")
    t0 = time.time()
    opt_cfg = section.optim
    train = EmojiDataset("train", image_size=data.image_size, per_class=data.per_class, seed=data.seed,
                         augment="full", classes=data.classes or None)
    test = EmojiDataset("test", image_size=data.image_size, per_class=section.test_per_class, seed=data.seed,
                        augment="full", classes=data.classes or None)
    names = train.class_names
    vocab = build_vocab([prompt(n, t) for n in names for t in TRAIN_TEMPLATES])
    cfg_dict = {**dict(section.config), "vocab": vocab}
    cfg_dict.setdefault("vision", {})
    cfg_dict["vision"] = {**EmbeddedCLIPConfig().vision, "image_size": data.image_size, **dict(cfg_dict["vision"])}
    torch.manual_seed(seed)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    model = EmbeddedCLIP(EmbeddedCLIPConfig.from_dict(cfg_dict))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opt_cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=opt_cfg.lr, betas=tuple(opt_cfg.betas))

    def lr_at(step: int) -> float:
        if step < opt_cfg.warmup_steps:
            return opt_cfg.lr * (step + 1) / opt_cfg.warmup_steps
        t = (step - opt_cfg.warmup_steps) / max(1, opt_cfg.steps - opt_cfg.warmup_steps)
        return opt_cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    images = train.images.float() / 255
    labels = train.labels
    k = len(names)
    per_step = max(1, opt_cfg.batch_size // k)
    pools = [torch.nonzero(labels == c).flatten() for c in range(k)]
    bar = tqdm(range(opt_cfg.steps), desc="clip", disable=not progress, dynamic_ncols=True)
    loss_avg = None
    for step in bar:
        idx = torch.cat([p[torch.randperm(len(p), generator=g)[:per_step]] for p in pools])
        y = labels[idx]
        texts = [prompt(names[int(c)], rng.choice(TRAIN_TEMPLATES)) for c in y]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        img = model.encode_image(_augment(images[idx], g))
        txt = model.encode_text(texts)
        logits = model.clip.logit_scale.exp() * img @ txt.T
        loss = _soft_clip_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.3f}", T=f"{model.clip.logit_scale.exp().item():.1f}", refresh=False)
    bar.close()
    model.eval()
    train_time = time.time() - t0
    held = zero_shot_eval(model, test.images, test.labels, names)
    light = EmojiDataset("test", image_size=data.image_size, per_class=section.test_per_class, seed=data.seed,
                         augment="light", classes=data.classes or None)
    held_light = zero_shot_eval(model, light.images, light.labels, names)
    out_dir = Path(out_dir)
    metrics = {"accuracy": held["accuracy"], "min_template_accuracy": held["min_template_accuracy"],
               "accuracy_light": held_light["accuracy"],
               "min_template_accuracy_light": held_light["min_template_accuracy"],
               "per_template_accuracy": held["per_template"],
               "cos_true": held["cos_true"], "cos_other": held["cos_other"], "test_images": held["n"],
               "test_augment": "full", "final_loss": loss_avg, "train_time_s": round(train_time, 1),
               "steps": opt_cfg.steps, "batch_size": per_step * k, "train_images": len(labels), "seed": seed,
               "data_seed": data.seed, "params": sum(p.numel() for p in model.parameters()),
               "logit_scale": float(model.clip.logit_scale.detach().exp())}
    # Stored in float16 (load_pretrained casts back to float32): halves the shipped size, cosine unchanged
    # to ~1e-3.
    save_pretrained(model.half(), out_dir, metadata={**metrics, "stored_dtype": "float16"})
    model.float()
    metrics["checkpoint_bytes"] = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    log(f"embedded CLIP: zero-shot accuracy {held['accuracy']:.4f} (ensemble; worst single template "
        f"{held['min_template_accuracy']:.4f}; light renders {held_light['accuracy']:.4f}) on {held['n']} "
        f"held-out renders; trained in {train_time:.0f} s; checkpoint {metrics['checkpoint_bytes'] / 1e6:.2f} MB")
    return metrics
