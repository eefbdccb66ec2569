"""Stage "clip": train the embedded CLIP (models/embedded_clip.py) contrastively on the shared loop.

Each batch holds ``batch_size // 56`` "full"-preset renders of every class (flipped and shifted,
data/augment.py), each paired with a prompt from a random training template. The loss is a symmetric
InfoNCE with soft targets over same-class pairs (no false negatives); the logit scale is clamped to
[0, log 100] after every step, as open_clip does. AdamW without decay on embeddings, norms and biases,
linear warm-up then cosine decay (``pretrain.clip.optim``).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from marval_rl.data.augment import flip_and_shift
from marval_rl.data.emoji import EmojiDataset
from marval_rl.data.prompts import TRAIN_TEMPLATES, prompt
from marval_rl.eval.zero_shot import zero_shot_eval
from marval_rl.models.checkpoints import save_pretrained
from marval_rl.models.embedded_clip import EmbeddedCLIP, EmbeddedCLIPConfig, build_vocab
from marval_rl.pretrain.common import register_pretrain_stage
from marval_rl.training import LossStage, Trainable, run_loop


def soft_clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: every same-class pair is a positive (no false negatives)."""
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    loss_i = -(targets * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(targets.T / targets.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def train_embedded_clip(section, data, out_dir, seed: int = 0, progress: bool = True, log=print,
                        checkpoint_every: int = 0, work_dir=None) -> dict:
    """Train the embedded CLIP on emoji-56 renders and save it (``save_pretrained``) into ``out_dir``.

    ``section``: a :class:`marval_rl.config.ClipTrainSection` (``config`` overrides
    :class:`EmbeddedCLIPConfig` fields; ``optim`` steps / batch / lr / schedule / weight decay;
    ``test_per_class`` held-out renders per class). ``data``: a DataSection with ``source: emoji``.
    ``checkpoint_every`` / ``work_dir``: the resumable training state, as in pretrain/classifier.py.
    Returns metrics (zero-shot accuracy on held-out renders of another seed stream, training time,
    checkpoint size, ...).
    """
    if getattr(data, "source", "emoji") != "emoji":
        raise ValueError(f"the embedded CLIP trains on data.source='emoji' renders, got {data.source!r}")
    t0 = time.time()
    classes = data.classes or None
    train = EmojiDataset("train", image_size=data.image_size, per_class=data.per_class, seed=data.seed,
                         augment="full", classes=classes)
    names = train.class_names
    vocab = build_vocab([prompt(n, t) for n in names for t in TRAIN_TEMPLATES])
    cfg_dict = {**dict(section.config), "vocab": vocab}
    cfg_dict["vision"] = {**EmbeddedCLIPConfig().vision, "image_size": data.image_size,
                          **dict(cfg_dict.get("vision", {}))}
    torch.manual_seed(seed)
    model = EmbeddedCLIP(EmbeddedCLIPConfig.from_dict(cfg_dict))
    images, labels = train.images.float() / 255, train.labels
    k = len(names)
    per_step = max(1, section.optim.batch_size // k)
    pools = [torch.nonzero(labels == c).flatten() for c in range(k)]

    def loss_fn(step, gen):
        idx = torch.cat([p[torch.randperm(len(p), generator=gen)[:per_step]] for p in pools])
        y = labels[idx]
        templates = torch.randint(0, len(TRAIN_TEMPLATES), (len(y),), generator=gen).tolist()
        texts = [prompt(names[int(c)], TRAIN_TEMPLATES[t]) for c, t in zip(y, templates)]
        img = model.encode_image(flip_and_shift(images[idx], gen))
        logits = model.clip.logit_scale.exp() * img @ model.encode_text(texts).T
        return soft_clip_loss(logits, y), {"temperature": model.clip.logit_scale.detach().exp()}

    @torch.no_grad()
    def clamp_logit_scale():
        model.clip.logit_scale.clamp_(0, math.log(100))

    stage = LossStage("clip", Trainable("clip", model, section.optim, no_decay_containing=("embedding",),
                                        after_step=clamp_logit_scale), loss_fn)
    out_dir = Path(out_dir)
    shipped, last = run_loop(stage, Path(work_dir or out_dir), generator=torch.Generator().manual_seed(seed),
                             log_every=max(1, section.optim.steps // 20), checkpoint_every=checkpoint_every,
                             progress=progress)
    model = shipped["clip"]
    train_time = time.time() - t0
    held = {}
    for preset in ("full", "light"):
        test = EmojiDataset("test", image_size=data.image_size, per_class=section.test_per_class, seed=data.seed,
                            augment=preset, classes=classes)
        held[preset] = zero_shot_eval(model, test.images, test.labels, names)
    full, light = held["full"], held["light"]
    metrics = {"accuracy": full["accuracy"], "min_template_accuracy": full["min_template_accuracy"],
               "accuracy_light": light["accuracy"], "min_template_accuracy_light": light["min_template_accuracy"],
               "per_template_accuracy": full["per_template"],
               "cos_true": full["cos_true"], "cos_other": full["cos_other"], "test_images": full["n"],
               "test_augment": "full", "final_loss": last["loss"], "train_time_s": round(train_time, 1),
               "steps": section.optim.steps, "batch_size": per_step * k, "train_images": len(labels), "seed": seed,
               "data_seed": data.seed, "params": sum(p.numel() for p in model.parameters()),
               "logit_scale": float(model.clip.logit_scale.detach().exp())}
    # Stored in float16 (load_pretrained casts back to float32): halves the shipped size, cosine unchanged
    # to ~1e-3.
    save_pretrained(model.half(), out_dir, metadata={**metrics, "stored_dtype": "float16"})
    model.float()
    metrics["checkpoint_bytes"] = sum((out_dir / f).stat().st_size for f in ("model.safetensors", "config.json"))
    log(f"embedded CLIP: zero-shot accuracy {full['accuracy']:.4f} (ensemble; worst single template "
        f"{full['min_template_accuracy']:.4f}; light renders {light['accuracy']:.4f}) on {full['n']} "
        f"held-out renders; trained in {train_time:.0f} s; checkpoint {metrics['checkpoint_bytes'] / 1e6:.2f} MB")
    return metrics


@register_pretrain_stage("clip")
def clip_stage(recipe, out_dir: Path, inputs) -> dict:
    return train_embedded_clip(recipe.pretrain.clip, recipe.data, Path(out_dir) / "clip", seed=recipe.pretrain.seed,
                               checkpoint_every=recipe.pretrain.checkpoint_every, work_dir=out_dir)
