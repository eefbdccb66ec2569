"""Data-parallel RL trainers across processes (``torchrun``): one process per GPU, or several on CPU.

Every rank runs the same controller loop on its own rollouts (seeds differ by rank), the trainer
averages gradients across ranks before each optimiser step (what DDP does; done by hand because the
one-step head is called K times per backward, which DDP's hooks do not support), so all ranks hold
identical weights; rank 0 alone writes logs, grids and checkpoints. A cheap per-update check
compares a weight fingerprint across ranks and stops the run if they ever diverge.

    torchrun --nproc_per_node 8 -m marval_rl.cli train RECIPE device=cuda            # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m marval_rl.cli train RECIPE ...

The same process group, set up by :func:`init_group` instead of torchrun, runs inside the trainer ranks
that ``train.trainer_ranks`` starts as Ray actors (``rl/ray_trainers.py``); everything below is shared.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def default_backend() -> str:
    """nccl with CUDA, gloo on CPU (or when ``MARVAL_DIST_BACKEND=gloo``)."""
    return "nccl" if torch.cuda.is_available() and os.environ.get("MARVAL_DIST_BACKEND") != "gloo" else "gloo"


def world() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        backend = default_backend()
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_group(rank: int, world_size: int, host: str, port: int, backend: str, timeout_s: float = 1800) -> None:
    """The process group of one trainer rank that no launcher set up (a Ray actor): TCP rendezvous at
    ``host:port`` (rank 0's node and a free port it picked)."""
    import datetime

    h = f"[{host}]" if ":" in host else host
    dist.init_process_group(backend=backend, init_method=f"tcp://{h}:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(0)   # the one GPU Ray gave this actor


def _comm_device() -> torch.device:
    """Where a collective's tensor must live: the current GPU for nccl, CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


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
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def all_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape on every rank), concatenated in rank order along dim 0."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    local = t.detach().to(_comm_device(), torch.float64).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device, t.dtype)


def reduce_stats(stats: dict) -> dict:
    """An update's metrics over all ranks: a maximum for keys that are maxima (``*max*``, ``version_lag``,
    ``time/*``), the mean for the rest (numbers only; every rank must pass the same keys)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return stats
    keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    is_max = [("max" in k or k == "version_lag" or k.startswith("time/")) for k in keys]
    vals = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    hi, mean = vals.clone(), vals.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    out = dict(stats)
    for k, m, a, b in zip(keys, is_max, hi.tolist(), mean.tolist()):
        out[k] = type(stats[k])(a) if m and isinstance(stats[k], int) else (a if m else b)
    return out


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
