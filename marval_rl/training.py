"""The one training loop every trainer that is not RL runs, and the pieces all trainers share.

:func:`run_loop` drives a :class:`TrainStage` (VAE, MAR teacher, classifier, embedded CLIP, GSIM
distillation): one weight-decay rule (:func:`param_groups`), one lr schedule (:func:`lr_at`), one
:class:`EMA`, one training-state file. The RL trainer (rl/trainer.py) shares the optimiser, schedule and
EMA, not the loop (its steps are rollouts, replays and update rules).

Data parallel (torchrun, ``distributed.py``): every rank runs this loop with the same generator,
takes its share of each global batch, and :meth:`Trainable.update` averages the gradients; rank 0
alone writes the log, the grids and the state, which every rank resumes from.

Exact resume: all randomness of a run comes from one ``torch.Generator`` (batches, masks, noise)
plus torch's global RNG (dropout); both states are saved with the weights, the optimiser and the
step, so a killed run resumes to the same numbers. Checkpoints are single files written atomically
(temp file + rename) and read back with ``weights_only=True``.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from marval_rl import strict_json
from marval_rl import distributed
from marval_rl.config import OptimSection
from marval_rl.models.checkpoints import (CheckpointError, atomic_write, load_state_dict_strict, remove_stale_temps,
                                          torch_load_safely)


def param_groups(model: nn.Module, weight_decay: float, no_decay_containing: tuple[str, ...] = (),
                 lr_scale=None):
    """The one weight-decay rule: AdamW decays matrices only, never biases, 1-D parameters (norms,
    gains) or parameters whose name contains one of ``no_decay_containing``.

    MAR excludes its whole diffusion head (``("diffloss.",)``), the embedded CLIP its token, positional
    and class embeddings (``("embedding",)``). ``lr_scale(name) -> float`` splits the groups further by
    a per-parameter lr multiplier (kept in each group as ``lr_scale`` and applied by :func:`set_lr`)."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in no_decay_containing)
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        groups.setdefault((no_decay, scale), []).append(p)
    if lr_scale is None:  # the historical two groups, in this order (optimizer state of old checkpoints)
        return [{"params": groups.get((False, 1.0), []), "weight_decay": weight_decay},
                {"params": groups.get((True, 1.0), []), "weight_decay": 0.0}]
    return [{"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr_scale": sc}
            for (nd, sc), ps in sorted(groups.items())]


def make_optimizer(model: nn.Module, optim: OptimSection, no_decay_containing=(), lr_scale=None) -> torch.optim.AdamW:
    if optim.lr <= 0 or optim.batch_size < 1:
        raise ValueError(f"optim needs lr > 0 and batch_size >= 1; got lr={optim.lr}, "
                         f"batch_size={optim.batch_size}")
    groups = param_groups(model, optim.weight_decay, no_decay_containing, lr_scale)
    for g in groups:
        g["lr"] = optim.lr * g.get("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))


LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, optim: OptimSection) -> float:
    """Linear warm-up over ``warmup_steps``, then ``schedule``: constant (MAR's schedule, for long EMA'd
    runs) or cosine decay to 0 at ``steps`` (for a model that is shipped as trained: the evaluators)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "cosine":
        t = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
        return optim.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if optim.schedule != "constant":
        raise ValueError(f"optim.schedule must be one of {', '.join(LR_SCHEDULES)}, got {optim.schedule!r}")
    return optim.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class EMA:
    """Exponential moving average of a model's parameters (decay per optimiser step).

    ``names``: average only these parameters (the RL trainer's trained subset); ``buffers``: average the
    floating-point buffers too (BatchNorm statistics) and copy the others, so the shipped copy's
    statistics match its weights."""

    def __init__(self, model: nn.Module, decay: float, names=None, buffers: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.buffers = decay, buffers
        wanted = None if names is None else set(names)
        self.shadow = {n: v.detach().clone() for n, v in self._tensors(model) if wanted is None or n in wanted}

    def _tensors(self, model: nn.Module):
        yield from model.named_parameters()
        if self.buffers:
            yield from model.named_buffers()

    @torch.no_grad()
    def update(self, model: nn.Module):
        for n, v in self._tensors(model):
            if n not in self.shadow:
                continue
            if v.is_floating_point():
                self.shadow[n].lerp_(v.detach(), 1.0 - self.decay)
            else:
                self.shadow[n].copy_(v)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Write the EMA weights into ``module`` (a model of the same structure)."""
        for n, v in self._tensors(module):
            if n in self.shadow:
                v.copy_(self.shadow[n])
        return module

    def averaged_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` carrying the EMA weights (the model itself is untouched)."""
        return self.copy_to(copy.deepcopy(model))

    def items(self):
        """(name, averaged tensor) pairs."""
        return self.shadow.items()

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict):
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not fit the model: {sorted(missing)[:5]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


# ----------------------------------------------------------------------------------- the loop
@dataclass
class Trainable:
    """One module a stage trains, with its own optimiser section (AdamW, lr schedule, clip, EMA).

    ``after_step``: run after each optimiser step (the embedded CLIP clamps its logit scale there).
    ``loss_scaling``: scale the loss for the backward pass and unscale before clipping (fp16 autocast,
    whose small gradients would otherwise flush to zero); a step with inf/NaN gradients is skipped."""
    name: str
    module: nn.Module
    optim: OptimSection
    no_decay_containing: tuple[str, ...] = ()
    ema_buffers: bool = False
    after_step: Callable[[], None] | None = None
    loss_scaling: bool = False
    ema_trained_only: bool = False   # average only the parameters that train (LoRA: not the frozen base)

    def __post_init__(self):
        self.optimizer = make_optimizer(self.module, self.optim, self.no_decay_containing)
        names = [n for n, p in self.module.named_parameters() if p.requires_grad] if self.ema_trained_only else None
        self.ema = EMA(self.module, self.optim.ema, names=names, buffers=self.ema_buffers) \
            if self.optim.ema > 0 else None
        device = next(self.module.parameters()).device.type
        self.scaler = torch.amp.GradScaler(device, enabled=self.loss_scaling)

    def update(self, loss: torch.Tensor) -> float:
        """zero_grad, backward, clip, step, EMA; returns the pre-clip gradient norm (0 with clipping off)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # data-parallel ranks (a no-op in one process), before unscaling: fp16's overflow check must then see
        # the same (averaged) gradients on every rank, so all ranks skip or step together
        distributed.average_gradients([p for p in self.module.parameters() if p.grad is not None])
        self.scaler.unscale_(self.optimizer)       # (no-op without loss scaling)
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.optim.grad_clip) \
            if self.optim.grad_clip > 0 else torch.tensor(0.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.module)
        if self.after_step is not None:
            self.after_step()
        return float(norm)

    def shipped(self) -> nn.Module:
        """What gets saved and sampled: an EMA copy when ``optim.ema > 0``, else the module itself."""
        return self.ema.averaged_copy(self.module) if self.ema is not None else self.module

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else {},
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {})}

    def load_state_dict(self, state: dict, source: str):
        load_state_dict_strict(self.module, state["model"], f"{source}['{self.name}']")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        if self.scaler.is_enabled() and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])


class TrainStage(Protocol):
    """What a trainer stage provides; :func:`run_loop` does everything else (lr, updates, EMA, logs,
    samples, checkpoints, resume).

    ``step`` computes this step's loss(es) from the run's generator and hands each to
    ``update(name, loss)``, which steps that trainable and returns its gradient norm; a stage with
    two players (GSIM: the auxiliary score, then the student) calls it once per update, in order.
    It returns the metrics to log. ``sample(step, shipped)`` (optional) writes a grid from the shipped
    (EMA) modules, by name."""
    name: str
    trainables: list[Trainable]

    def step(self, step: int, generator: torch.Generator, update: Callable[[str, torch.Tensor], float]) -> dict: ...


class LossStage:
    """A stage with one trainable ``model`` and one loss: ``loss_fn(step, generator) -> (loss, info)``."""

    def __init__(self, name: str, trainable: Trainable, loss_fn, on_sample=None):
        self.name, self.trainables, self.loss_fn, self.on_sample = name, [trainable], loss_fn, on_sample

    def step(self, step, generator, update) -> dict:
        loss, info = self.loss_fn(step, generator)
        grad_norm = update(self.trainables[0].name, loss)
        return {"loss": loss.item(), "grad_norm": grad_norm,
                **{k: float(v.detach()) if torch.is_tensor(v) else v for k, v in info.items()}}

    def sample(self, step: int, shipped: dict) -> None:
        if self.on_sample is not None:
            self.on_sample(step, shipped[self.trainables[0].name])


def save_training_state(path: str | Path, *, step: int, trainables: list[Trainable], generator,
                        extra: dict | None = None, torch_rng_ranks: list | None = None) -> Path:
    """Everything needed to continue exactly where we are, in one atomically written file.
    ``torch_rng_ranks``: every data-parallel rank's global RNG state (its dropout), rank 0's first."""
    state = {"step": step, "trainables": {t.name: t.state_dict() for t in trainables},
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "extra": extra or {},
             **({"torch_rng_ranks": torch_rng_ranks} if torch_rng_ranks and len(torch_rng_ranks) > 1 else {})}
    path = Path(path)
    atomic_write(path, lambda p: torch.save(state, p))
    return path


def load_training_state(path: str | Path, *, trainables: list[Trainable], generator) -> dict:
    """Restore what :func:`save_training_state` wrote; returns the state (``step``, ``extra``)."""
    state = torch_load_safely(path)
    if not isinstance(state, dict) or "trainables" not in state:
        raise CheckpointError(f"{path} is not a training state of this marval-rl version (no 'trainables'; "
                              f"states written before the shared training loop do not resume: start afresh)")
    names = sorted(t.name for t in trainables)
    if sorted(state["trainables"]) != names:
        raise CheckpointError(f"{path} holds trainables {sorted(state['trainables'])}, this stage trains {names}")
    for t in trainables:
        t.load_state_dict(state["trainables"][t.name], str(path))
    generator.set_state(state["generator"])
    ranks = state.get("torch_rng_ranks") or []
    if len(ranks) == distributed.world_size() > 1:
        torch.set_rng_state(ranks[distributed.rank()])
    else:   # a state of another world size: rank 0's stream, forked per rank from a seed drawn from it
        torch.set_rng_state(state["torch_rng"])
        distributed.fork_global_rng(int(torch.randint(0, 2 ** 62, (1,)).item()) if distributed.active() else None)
    return state


def run_loop(stage: TrainStage, out_dir: Path, *, generator: torch.Generator, log_every: int,
             checkpoint_every: int, sample_every: int = 0, progress: bool = True,
             resume_from: Path | None = None) -> tuple[dict, dict]:
    """Train ``stage`` for its first trainable's ``optim.steps`` steps; resume if a state exists.

    Files in ``out_dir``: ``{name}_train_state.pt`` (every ``checkpoint_every`` steps and at the end;
    0 = never) and ``{name}_metrics.jsonl`` (every ``log_every`` steps and the
    last). ``resume_from``: a state file of another folder to continue from (its log rows up to that
    step come along). Returns the shipped modules by name (EMA copies, eval mode) and the last
    logged metrics."""
    name, trainables = stage.name, stage.trainables
    by_name = {t.name: t for t in trainables}
    steps = trainables[0].optim.steps
    if steps < 1:
        raise ValueError(f"[{name}] optim.steps must be >= 1, got {steps}")
    main = distributed.is_main()           # rank 0 writes; every rank reads the same state on resume
    out_dir = Path(out_dir)
    state_path, log_path = out_dir / f"{name}_train_state.pt", out_dir / f"{name}_metrics.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)
    distributed.barrier()
    source = Path(resume_from) if resume_from is not None else (state_path if state_path.is_file() else None)
    source = distributed.broadcast_object(source)   # rank 0's view: one decision for every rank
    start = 0
    if source is None:
        distributed.fork_global_rng()
    if source is not None:
        start = load_training_state(source, trainables=trainables, generator=generator)["step"]
        if main and source.parent.resolve() != out_dir.resolve() and (source.parent / log_path.name).is_file():
            shutil.copyfile(source.parent / log_path.name, log_path)
        if main:
            print(f"[{name}] resuming from step {start} ({source})")
    if main:
        sync_log(log_path, "step", start)

    def update(trainable: str, loss: torch.Tensor) -> float:
        # every rank decides together: one rank raising alone would leave the others in the all-reduce
        if not distributed.all_true(bool(torch.isfinite(loss))):
            raise FloatingPointError(f"[{name}] {trainable} loss is {loss.item()} at step {step}"
                                     f"{f' on rank {distributed.rank()} (not finite on some rank)' if distributed.active() else ''}; "
                                     f"lower the lr or check the data")
        return by_name[trainable].update(loss)

    metrics: dict = {}
    for t in trainables:
        t.module.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, disable=not (progress and main))
    t0 = time.perf_counter()
    for step in bar:
        for t in trainables:
            set_lr(t.optimizer, lr_at(step, t.optim))
        info = stage.step(step, generator, update)
        done = step + 1
        if done % log_every == 0 or done == steps:
            info = distributed.reduce_stats(info)    # the global batch's means (each rank saw its share)
            metrics = {"step": done, "lr": trainables[0].optimizer.param_groups[0]["lr"],
                       "seconds": time.perf_counter() - t0, **info}
            first = next(iter(info), None)
            if first is not None:
                bar.set_postfix({first: f"{info[first]:.4f}"})
            if main:
                with open(log_path, "a") as f:
                    f.write(strict_json.dumps(metrics) + "\n")
        if main and sample_every and hasattr(stage, "sample") and (done % sample_every == 0 or done == steps):
            shipped = {t.name: t.shipped().eval() for t in trainables}
            with torch.no_grad():
                stage.sample(done, shipped)
            for t in trainables:
                t.module.train()
        if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
            for t in trainables:
                distributed.check_in_sync(t.module)   # ranks that drifted apart must not be saved as one
            rngs = distributed.all_gather_object(torch.get_rng_state())
            if main:
                save_training_state(state_path, step=done, trainables=trainables, generator=generator,
                                    torch_rng_ranks=rngs)
    distributed.barrier()                             # every rank's last step is in the state rank 0 wrote
    return {t.name: t.shipped().eval() for t in trainables}, metrics


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

