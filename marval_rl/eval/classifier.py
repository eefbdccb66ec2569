"""The embedded emoji-56 classifier: a ~120k-parameter CNN used as a reward and as the FID-proxy feature net.

Convention (shared by every evaluator and reward in the project): inputs are float images
``[B, 3, H, W]`` in **[0, 1]**. Resizing to the training resolution and normalisation happen
inside, so callers pass generator outputs as they are, and gradients flow back to the pixels.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


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


def check_images(images, what: str = "images") -> None:
    """Raise a clear ValueError unless ``images`` is a float [B, 3, H, W] tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected {what} as a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected {what} of shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float {what} in [0, 1], got dtype {images.dtype} "
                         f"(convert uint8 with images.float() / 255)")
    if images.numel() == 0 or images.device.type == "meta":
        return
    lo, hi = torch.aminmax(images.detach())
    # A small tolerance: decoders and resampling overshoot [0, 1] by rounding error.
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"expected {what} in [0, 1] (the evaluator convention), got values in "
                         f"[{lo.item():.3f}, {hi.item():.3f}]; images in [-1, 1] need (x + 1) / 2")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


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


# --------------------------------------------------------------------------- training
def _augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """On-the-fly flips and small shifts: the renders are fixed, so this multiplies the variety
    seen at ~no cost (both are within the "full" preset's own distribution)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = F.pad(x, [max_shift] * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g).tolist()
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


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


def train_classifier(section, data, out_dir, seed: int = 0, progress: bool = True, log=print):
    """Train an EmojiClassifier on emoji-56 renders, evaluate it held out, save it to ``out_dir``.

    ``section``: config.ClassifierTrainSection; ``data``: config.DataSection (its image_size,
    per_class and seed; the train split always uses "full" augmentation). Returns (model, metrics).
    Schedule: linear warm-up, then cosine decay to 0 (a classifier that is shipped benefits from
    annealing; the MAR recipe's constant lr targets long EMA'd runs).
    """
    from tqdm.auto import tqdm

    from marval_rl.data.emoji import EmojiDataset
    from marval_rl.models.checkpoints import save_pretrained

    if getattr(data, "source", "emoji") != "emoji":
        raise ValueError(f"the embedded classifier trains on data.source='emoji' renders, got {data.source!r}")
    opt_cfg = section.optim
    t0 = time.time()
    train = EmojiDataset("train", image_size=data.image_size, per_class=data.per_class, seed=data.seed,
                         augment="full")
    test = EmojiDataset("test", image_size=data.image_size, per_class=section.test_per_class,
                        seed=data.seed, augment="full")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = EmojiClassifier(ClassifierConfig(num_classes=train.num_classes, image_size=data.image_size))
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on BN / biases
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opt_cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=opt_cfg.lr, betas=tuple(opt_cfg.betas))
    ema = None
    if opt_cfg.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(opt_cfg.ema), use_buffers=True)

    def lr_at(step: int) -> float:
        if step < opt_cfg.warmup_steps:
            return opt_cfg.lr * (step + 1) / opt_cfg.warmup_steps
        t = (step - opt_cfg.warmup_steps) / max(1, opt_cfg.steps - opt_cfg.warmup_steps)
        return opt_cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    images = train.images.float() / 255  # uint8 -> [0, 1]: the model's input convention
    labels = train.labels
    n, bs = len(labels), min(opt_cfg.batch_size, len(labels))
    order, pos = torch.randperm(n, generator=g), 0
    bar = tqdm(range(opt_cfg.steps), desc="classifier", disable=not progress, dynamic_ncols=True)
    loss_avg = None
    for step in bar:
        if pos + bs > n:  # epoch boundary: reshuffle, drop the ragged tail
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + bs]
        pos += bs
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = F.cross_entropy(model(_augment(images[idx], g)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr_at(step):.1e}", refresh=False)
    bar.close()
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    model.eval()
    train_time = time.time() - t0
    held_out = evaluate_accuracy(model, test.images, test.labels)
    metrics = {"accuracy": held_out["accuracy"], "mean_p_true": held_out["mean_p_true"],
               "test_images": held_out["n"], "test_augment": "full", "final_loss": loss_avg,
               "train_time_s": round(train_time, 1), "steps": opt_cfg.steps, "batch_size": bs,
               "train_images": n, "seed": seed, "data_seed": data.seed,
               "params": sum(p.numel() for p in model.parameters())}
    log(f"classifier: held-out accuracy {metrics['accuracy']:.4f} (mean p(true) "
        f"{metrics['mean_p_true']:.3f}) on {held_out['n']} test renders; trained in {train_time:.0f} s")
    save_pretrained(model, Path(out_dir), metadata=metrics)
    return model, metrics
