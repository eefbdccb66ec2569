"""Pieces every trainer shares: optimiser set-up, lr schedule, EMA, and exact-resume checkpoints.

Exact resume: all randomness of a run comes from one ``torch.Generator`` (batches, masks, noise)
plus torch's global RNG (dropout); both states are saved with the weights, the optimiser and the
step, so a killed run resumes to the same numbers. Checkpoints are single files written atomically
(temp file + rename) and read back with ``weights_only=True``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from marval_rl.config import OptimSection
from marval_rl.models.checkpoints import atomic_write, torch_load_safely


def param_groups(model: nn.Module, weight_decay: float, no_decay_prefixes: tuple[str, ...] = (),
                 lr_scale=None):
    """AdamW groups: no decay on biases, 1-D parameters (norms, gains) and the listed sub-modules.

    MAR excludes its whole diffusion head from weight decay (``no_decay_prefixes=("diffloss",)``).
    ``lr_scale(name) -> float`` splits the groups further by a per-parameter lr multiplier (kept in each
    group as ``lr_scale`` and applied by :func:`set_lr`)."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name.startswith(no_decay_prefixes)
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        groups.setdefault((no_decay, scale), []).append(p)
    if lr_scale is None:  # the historical two groups, in this order (optimizer state of old checkpoints)
        return [{"params": groups.get((False, 1.0), []), "weight_decay": weight_decay},
                {"params": groups.get((True, 1.0), []), "weight_decay": 0.0}]
    return [{"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr_scale": sc}
            for (nd, sc), ps in sorted(groups.items())]


def make_optimizer(model: nn.Module, optim: OptimSection, no_decay_prefixes=(), lr_scale=None) -> torch.optim.AdamW:
    if optim.lr <= 0 or optim.batch_size < 1:
        raise ValueError(f"optim needs lr > 0 and batch_size >= 1; got lr={optim.lr}, "
                         f"batch_size={optim.batch_size}")
    groups = param_groups(model, optim.weight_decay, no_decay_prefixes, lr_scale)
    for g in groups:
        g["lr"] = optim.lr * g.get("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))


def lr_at(step: int, optim: OptimSection) -> float:
    """Linear warm-up, then constant (MAR's schedule)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    return optim.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class EMA:
    """Exponential moving average of a model's parameters (decay per optimiser step)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module):
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Write the EMA weights into ``module`` (a model of the same structure)."""
        for n, p in module.named_parameters():
            p.copy_(self.shadow[n])
        return module

    def averaged_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` carrying the EMA weights (the model itself is untouched)."""
        return self.copy_to(copy.deepcopy(model))

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict):
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not fit the model: {sorted(missing)[:5]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


def save_training_state(path: str | Path, *, step: int, model: nn.Module, optimizer, generator,
                        ema: EMA | None = None, extra: dict | None = None) -> Path:
    """Everything needed to continue exactly where we are, in one atomically written file."""
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
             "ema": ema.state_dict() if ema is not None else {}, "extra": extra or {}}
    path = Path(path)
    atomic_write(path, lambda p: torch.save(state, p))
    return path


def load_training_state(path: str | Path, *, model: nn.Module, optimizer, generator,
                        ema: EMA | None = None) -> dict:
    """Restore what :func:`save_training_state` wrote; returns the state (``step``, ``extra``)."""
    state = torch_load_safely(path)
    from marval_rl.models.checkpoints import load_state_dict_strict

    load_state_dict_strict(model, state["model"], f"{path}['model']")
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if ema is not None and state["ema"]:
        ema.load_state_dict(state["ema"])
    return state


def sync_log(path: str | Path, key: str, upto: int) -> None:
    """Make a JSONL metrics log agree with the training state it belongs to.

    ``upto = 0`` (a fresh start) removes an old log; on resume at step ``upto``, rows with
    ``row[key] > upto`` (logged after the last checkpoint, redone now) and a half-written last line
    of a killed write are dropped, so every step appears exactly once. Rewritten atomically."""
    path = Path(path)
    if not path.is_file():
        return
    if upto <= 0:
        path.unlink()
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get(key), (int, float)) and row[key] <= upto:
            keep.append(line)
    atomic_write(path, lambda p: Path(p).write_text("".join(x + "\n" for x in keep)))


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of one training batch, drawn without replacement from the run's generator."""
    if n == 0:
        raise ValueError("the dataset is empty")
    return torch.randperm(n, generator=generator)[:batch_size] if batch_size <= n else \
        torch.randint(0, n, (batch_size,), generator=generator)

