"""The loop shared by the pretraining stages: batches, optimiser step, EMA, logs, checkpoints, resume."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from marval_rl.config import OptimSection
from marval_rl.models.checkpoints import remove_stale_temps
from marval_rl.training import (EMA, batch_indices, load_training_state, lr_at, make_optimizer,
                                save_training_state, set_lr, sync_log)


STAGES = ("vae", "mar", "classifier", "clip")


def check_data_section(d, key: str = "data", files: bool = True) -> None:
    """The ``data:`` section, before any image is rendered or read; RecipeError naming the key."""
    from marval_rl.config import RecipeError

    if d.source not in ("emoji", "imagefolder", "latents"):
        raise RecipeError(f"{key}.source must be emoji, imagefolder or latents, got {d.source!r}")
    if d.image_size < 1:
        raise RecipeError(f"{key}.image_size must be >= 1, got {d.image_size}")
    if d.per_class < 1:
        raise RecipeError(f"{key}.per_class must be >= 1 (renders per class; fewer is an empty dataset), "
                          f"got {d.per_class}")
    if d.num_workers < 0:
        raise RecipeError(f"{key}.num_workers must be >= 0, got {d.num_workers}")
    if d.source == "emoji":
        if d.augment not in ("none", "light", "full"):
            raise RecipeError(f"{key}.augment must be none, light or full, got {d.augment!r}")
        from marval_rl.data.emoji import NUM_CLASSES

        bad = [c for c in d.classes if not 0 <= c < NUM_CLASSES]
        if bad or len(set(d.classes)) != len(d.classes):
            raise RecipeError(f"{key}.classes must be distinct emoji class ids in [0, {NUM_CLASSES}), got {list(d.classes)}")
    else:
        want = "folder of class sub-folders" if d.source == "imagefolder" else "file written by cache_latents"
        root = Path(d.root) if d.root else None
        if root is None:
            raise RecipeError(f"{key}.source={d.source} needs {key}.root (the {want})")
        ok = root.is_dir() if d.source == "imagefolder" else root.is_file()
        if files and not ok:   # (files=False: `validate` of a recipe for another machine only warns)
            raise RecipeError(f"{key}.root={d.root}: {'no such folder' if d.source == 'imagefolder' else 'no such file'} "
                              f"(the {want})")


def check_pretrain_recipe(recipe, files: bool = True) -> None:
    """Everything ``marval-rl pretrain`` can check before it renders data or builds a model (``files``:
    also that the data files exist)."""
    from marval_rl.config import RecipeError, check_optim

    p = recipe.pretrain
    unknown = [s for s in p.stages if s not in STAGES]
    if unknown or not p.stages:
        what = f"unknown stage(s) {unknown}" if unknown else "no stage given"
        raise RecipeError(f"pretrain.stages: {what}; use any of {', '.join(STAGES)}")
    if p.log_every < 1:
        raise RecipeError(f"pretrain.log_every must be >= 1, got {p.log_every}")
    for name in ("sample_every", "checkpoint_every"):
        if getattr(p, name) < 0:
            raise RecipeError(f"pretrain.{name} must be >= 0 (0 = off), got {getattr(p, name)}")
    check_data_section(recipe.data, files=files)
    for stage in p.stages:
        check_optim(getattr(p, stage).optim, f"pretrain.{stage}.optim")
    if "vae" in p.stages:
        from marval_rl.models.vae import VAEConfig

        if p.vae.kl_weight < 0:
            raise RecipeError(f"pretrain.vae.kl_weight must be >= 0, got {p.vae.kl_weight}")
        try:
            config = VAEConfig.from_dict(dict(p.vae.config))
        except (TypeError, ValueError) as e:
            raise RecipeError(f"pretrain.vae.config: {e}") from e
        if recipe.data.image_size % config.stride:
            raise RecipeError(f"data.image_size {recipe.data.image_size} is not divisible by the VAE stride "
                              f"{config.stride} (pretrain.vae.config.ch_mult)")
    if "mar" in p.stages:
        from marval_rl.models.mar import MARConfig

        try:
            MARConfig.from_dict(dict(p.mar.config))
        except (TypeError, ValueError) as e:
            raise RecipeError(f"pretrain.mar.config: {e}") from e
        if "vae" not in p.stages:
            if not recipe.vae.checkpoint:
                raise RecipeError("stage 'mar' needs a VAE: run stage 'vae' first or set vae.checkpoint")
            from marval_rl.loading import check_vae_section

            check_vae_section(recipe.vae)
    for stage in ("classifier", "clip"):
        if stage in p.stages and getattr(p, stage).test_per_class < 1:
            raise RecipeError(f"pretrain.{stage}.test_per_class must be >= 1, got {getattr(p, stage).test_per_class}")


def collate(dataset, idx: torch.Tensor):
    """Stack dataset items (tensor, label) for the given indices."""
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def run_loop(*, name: str, model: torch.nn.Module, optim: OptimSection, out_dir: Path,
             loss_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, dict]],
             generator: torch.Generator, log_every: int, checkpoint_every: int,
             sample_every: int = 0, on_sample: Callable[[int, torch.nn.Module], None] | None = None,
             no_decay_prefixes=(), progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` for ``optim.steps`` steps of ``loss_fn(step, generator)``; resume if a state exists.

    Returns the model to ship (the EMA copy when ``optim.ema > 0``) and the last logged metrics.
    """
    if optim.steps < 1:
        raise ValueError(f"[{name}] optim.steps must be >= 1, got {optim.steps}")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    state_path = out_dir / f"{name}_train_state.pt"
    optimizer = make_optimizer(model, optim, no_decay_prefixes)
    ema = EMA(model, optim.ema) if optim.ema > 0 else None
    start = 0
    if state_path.is_file():
        start = load_training_state(state_path, model=model, optimizer=optimizer, generator=generator,
                                    ema=ema)["step"]
        print(f"[{name}] resuming from step {start} ({state_path})")
    log_path = out_dir / f"{name}_metrics.jsonl"
    sync_log(log_path, "step", start)
    metrics: dict = {}
    model.train()
    bar = tqdm(range(start, optim.steps), initial=start, total=optim.steps, desc=name, disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        set_lr(optimizer, lr_at(step, optim))
        loss, info = loss_fn(step, generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{name}] loss is {loss.item()} at step {step}; lower the lr or "
                                     f"check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip) \
            if optim.grad_clip > 0 else torch.tensor(0.0)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        done = step + 1
        if done % log_every == 0 or done == optim.steps:
            metrics = {"step": done, "loss": loss.item(), "grad_norm": float(grad_norm),
                       "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
                       **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in info.items()}}
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            with open(log_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if sample_every and on_sample is not None and (done % sample_every == 0 or done == optim.steps):
            shipped = ema.averaged_copy(model) if ema is not None else model
            shipped.eval()
            with torch.no_grad():
                on_sample(done, shipped)
            model.train()
        if checkpoint_every and (done % checkpoint_every == 0 or done == optim.steps):
            save_training_state(state_path, step=done, model=model, optimizer=optimizer,
                                generator=generator, ema=ema)
    final = ema.averaged_copy(model) if ema is not None else model
    return final.eval(), metrics
