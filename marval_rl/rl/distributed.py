"""Data-parallel RL trainers across processes (``torchrun``): one process per GPU, or several on CPU.

Every rank runs the same controller loop on its own rollouts (seeds differ by rank), the trainer
averages gradients across ranks before each optimiser step (what DDP does; done by hand because the
one-step head is called K times per backward, which DDP's hooks do not support), so all ranks hold
identical weights; rank 0 alone writes logs, grids and checkpoints. A cheap per-update check
compares a weight fingerprint across ranks and stops the run if they ever diverge.

    torchrun --nproc_per_node 8 -m marval_rl.cli train RECIPE device=cuda            # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m marval_rl.cli train RECIPE ...
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("MARVAL_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params) -> None:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= dist.get_world_size()


def check_in_sync(module: torch.nn.Module) -> None:
    """Raise if ranks hold different weights (a bug, or non-deterministic kernels)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    fp = torch.stack([sum(p.detach().double().sum() for p in module.parameters()),
                      sum(p.detach().double().abs().sum() for p in module.parameters())])
    lo, hi = fp.clone(), fp.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.allclose(lo, hi, rtol=1e-6, atol=0):
        raise RuntimeError(f"trainer ranks diverged (weight fingerprints {lo.tolist()} vs {hi.tolist()})")


def all_mean(value: float) -> float:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
