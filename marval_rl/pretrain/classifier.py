"""Stage "classifier": train the embedded emoji-56 classifier (models/classifier.py) on the shared loop.

Cross-entropy on "full"-preset renders with flips and shifts (data/augment.py), AdamW without decay on
BatchNorm / biases (training.param_groups), linear warm-up then cosine decay to 0 (a model shipped as
trained benefits from annealing; ``pretrain.classifier.optim.schedule``), optional EMA that averages the
BatchNorm statistics too. Evaluated on held-out renders of another seed stream, then saved; the
FID-proxy reference statistics of its features are written beside it (:func:`build_embedded_evaluators`).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from marval_rl.data.augment import flip_and_shift
from marval_rl.data.emoji import EmojiDataset
from marval_rl.eval.classifier import evaluate_accuracy
from marval_rl.eval.fid import FIDProxy, blur3x3, compute_reference_stats
from marval_rl.models.checkpoints import save_pretrained
from marval_rl.models.classifier import ClassifierConfig, EmojiClassifier
from marval_rl.pretrain.common import register_pretrain_stage
from marval_rl.training import LossStage, Trainable, batch_indices, run_loop


def train_classifier(section, data, out_dir, seed: int = 0, progress: bool = True, log=print,
                     checkpoint_every: int = 0, work_dir=None):
    """Train an EmojiClassifier on emoji-56 renders, evaluate it held out, save it to ``out_dir``.

    ``section``: config.ClassifierTrainSection; ``data``: config.DataSection (its image_size,
    per_class and seed; the train split always uses "full" augmentation). ``checkpoint_every``: write
    the resumable training state that often (0: never) into ``work_dir`` (default ``out_dir``; the
    CLI passes the run folder, so the checkpoint folder holds only what ships). Returns (model, metrics).
    """
    if getattr(data, "source", "emoji") != "emoji":
        raise ValueError(f"the embedded classifier trains on data.source='emoji' renders, got {data.source!r}")
    t0 = time.time()
    train = EmojiDataset("train", image_size=data.image_size, per_class=data.per_class, seed=data.seed,
                         augment="full")
    test = EmojiDataset("test", image_size=data.image_size, per_class=section.test_per_class,
                        seed=data.seed, augment="full")
    torch.manual_seed(seed)
    model = EmojiClassifier(ClassifierConfig(num_classes=train.num_classes, image_size=data.image_size))
    images, labels = train.images.float() / 255, train.labels   # uint8 -> [0, 1]: the model's convention
    bs = min(section.optim.batch_size, len(labels))

    def loss_fn(step, gen):
        idx = batch_indices(len(labels), bs, gen)
        return F.cross_entropy(model(flip_and_shift(images[idx], gen)), labels[idx]), {}

    stage = LossStage("classifier", Trainable("classifier", model, section.optim, ema_buffers=True), loss_fn)
    out_dir = Path(out_dir)
    shipped, last = run_loop(stage, Path(work_dir or out_dir), generator=torch.Generator().manual_seed(seed),
                             log_every=max(1, section.optim.steps // 20), checkpoint_every=checkpoint_every,
                             progress=progress)
    model = shipped["classifier"]
    train_time = time.time() - t0
    held_out = evaluate_accuracy(model, test.images, test.labels)
    metrics = {"accuracy": held_out["accuracy"], "mean_p_true": held_out["mean_p_true"],
               "test_images": held_out["n"], "test_augment": "full", "final_loss": last["loss"],
               "train_time_s": round(train_time, 1), "steps": section.optim.steps, "batch_size": bs,
               "train_images": len(labels), "seed": seed, "data_seed": data.seed,
               "params": sum(p.numel() for p in model.parameters())}
    log(f"classifier: held-out accuracy {metrics['accuracy']:.4f} (mean p(true) "
        f"{metrics['mean_p_true']:.3f}) on {held_out['n']} test renders; trained in {train_time:.0f} s")
    save_pretrained(model, out_dir, metadata=metrics)
    return model, metrics


def build_embedded_evaluators(train_section, data_section, out_root, seed: int = 0,
                              progress: bool = True, log=print, checkpoint_every: int = 0) -> dict:
    """Train the classifier into ``out_root/classifier`` and write FID stats into ``out_root/fid``.

    Reference images: held-out *test* renders (64 per class) with the "light" augmentation preset,
    because generators are trained on light renders; "full" renders (random backgrounds, big
    rotations) would make even a perfect generator look far from the reference.
    Returns the classifier metrics plus sanity FID-proxy values (real < blurred < noise).
    """
    out_root = Path(out_root)
    model, metrics = train_classifier(train_section, data_section, out_root / "classifier", seed=seed,
                                      progress=progress, log=log, checkpoint_every=checkpoint_every, work_dir=out_root)
    ref_kw = dict(image_size=data_section.image_size, per_class=64, augment="light")
    ref = EmojiDataset("test", seed=data_section.seed, **ref_kw)
    compute_reference_stats(model, ref.images, out_root / "fid", provenance={
        "images": f"EmojiDataset('test', per_class=64, augment='light', seed={data_section.seed}, "
                  f"image_size={data_section.image_size})",
        "why_light": "generators are trained on light renders"})
    # Sanity: a second, different-seed real set must score far below its degraded versions.
    fid = FIDProxy(model, out_root / "fid")
    real = EmojiDataset("test", seed=data_section.seed + 1, **ref_kw).images.float() / 255
    metrics["fid_real"] = fid.score(real)
    metrics["fid_blur3x3"] = fid.score(blur3x3(real))
    metrics["fid_uniform_noise"] = fid.score(torch.rand(real.shape, generator=torch.Generator().manual_seed(0)))
    log(f"FID-proxy sanity: real {metrics['fid_real']:.3f}, blurred {metrics['fid_blur3x3']:.3f}, "
        f"uniform noise {metrics['fid_uniform_noise']:.1f}")
    return metrics


@register_pretrain_stage("classifier")
def classifier_stage(recipe, out_dir: Path, inputs) -> dict:
    return build_embedded_evaluators(recipe.pretrain.classifier, recipe.data, out_dir,
                                     checkpoint_every=recipe.pretrain.checkpoint_every)
