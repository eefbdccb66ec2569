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
