"""The one torch.distributed seam: rank and world size, gradient averaging, data sharding, rank-0
writes and the ranks-in-sync check, for every trainer (distillation, pretraining, the RL trainer,
evaluation's generation). Nothing else in the package calls ``torch.distributed``.

Launch one process per GPU (or several on CPU) with torchrun; ``accelerate launch`` sets the same
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and works the same way::

    torchrun --standalone --nproc_per_node 8 -m marval_rl.cli distill RECIPE device=cuda
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m marval_rl.cli train RECIPE ...

Data parallelism by one rule: **N ranks at per-rank batch B/N compute what one process computes at
batch B.** Every rank holds the same ``torch.Generator`` (same seed, same state, saved in the same
training state), draws the *global* batch's indices and randomness from it, and keeps its own rows
(:func:`shard`, :func:`local_rows`); the per-rank loss is the mean over its rows, and the gradients are
averaged across ranks before clipping (:func:`average_gradients`, what DDP does; done by hand because
the one-step head is called K times per backward, which DDP's hooks do not support). So all ranks hold
identical weights, optimiser and EMA states, and a checkpoint rank 0 writes resumes every rank.
Random draws are cheap next to the networks, so drawing the global batch's costs nothing that matters.

The RL trainer ranks that ``train.trainer_ranks`` starts as Ray actors join the same kind of process
group through :func:`init_group` instead of torchrun; everything below is shared.
"""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


_STOPPING = False   # set once this rank has said why it stops (the launcher's SIGTERM then adds no 2nd line)


def reported_stop() -> None:
    """This rank has printed its one line about stopping: a SIGTERM from the launcher now exits quietly."""
    global _STOPPING
    _STOPPING = True


class RankStopped(RuntimeError):
    """This rank cannot go on because another one stopped (its own message is on its own output)."""


def stopped_by_peer(e: BaseException, out_dir) -> RankStopped | None:
    """The one-line stop of a rank whose collective failed because a peer died (killed, out of memory):
    the state rank 0 last wrote is whole (written atomically), so rerunning the command resumes it."""
    import traceback

    in_collective = isinstance(e, RuntimeError) and e.__traceback__ is not None and any(
        "torch/distributed/" in f.filename.replace("\\", "/") for f in traceback.extract_tb(e.__traceback__))
    if not (active() and (isinstance(e, dist.DistError) or in_collective)):   # (gloo raises a plain RuntimeError)
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return RankStopped(f"rank {rank()} stopped: another rank is gone ({first[:160]}); the last saved state in "
                       f"{out_dir} is intact: run the same command again to resume")


def default_backend(device: str | None = None) -> str:
    """nccl for a CUDA run, gloo on CPU (a recipe with ``device=cpu`` on a GPU machine too, or when
    ``MARVAL_DIST_BACKEND=gloo``)."""
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    return "nccl" if cuda and os.environ.get("MARVAL_DIST_BACKEND") != "gloo" else "gloo"


def world(device: str | None = None) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun / accelerate, for the
    recipe's ``device``. With nccl, this rank's GPU (LOCAL_RANK) becomes the current device, so
    ``device=cuda`` means it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        backend = default_backend(device)
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """More than one rank in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one rank that writes files (logs, states, grids, the shipped model)."""
    return rank() == 0


def check_divides(global_batch: int, key: str) -> None:
    """The global batch must split evenly over the ranks (each rank's share is one slice of it)."""
    n = world_size()
    if global_batch % n:
        raise ValueError(f"{key}={global_batch} is not divisible by the world size {n} (torchrun "
                         f"--nproc_per_node x nodes): each rank takes an equal share of the global batch")


def local_rows(n: int) -> slice:
    """This rank's rows of a global batch of ``n`` rows (contiguous, in rank order)."""
    size = world_size()
    if n % size:
        raise ValueError(f"a global batch of {n} rows does not split over {size} ranks")
    per = n // size
    return slice(rank() * per, (rank() + 1) * per)


def shard(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This rank's share of a tensor drawn for the global batch (rows along ``dim``)."""
    if not active():
        return t
    rows = local_rows(t.shape[dim])
    return t.narrow(dim, rows.start, rows.stop - rows.start)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def fork_global_rng(base: int | None = None) -> None:
    """Give each rank > 0 its own stream of torch's global RNG (dropout), derived from ``base`` (default:
    the seed every rank set): the batch's shared randomness comes from the run's generator, dropout masks
    must differ per rank."""
    if active() and rank() > 0:
        torch.manual_seed((torch.initial_seed() if base is None else base) + 1_000_003 * rank())


def all_true(flag: bool) -> bool:
    """True on every rank only if ``flag`` is true on every rank (a check every rank must act on together)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def on_main(fn: Callable[[], T], what: str) -> T | None:
    """Run ``fn`` on rank 0 alone (a write: preparing the output folder, the run record) while the other
    ranks wait; if it raised there, every other rank raises :class:`RankStopped` instead of waiting for a
    collective that never comes. Returns ``fn``'s result on rank 0, None elsewhere."""
    if not active():
        return fn()
    result, failure = None, ""
    if is_main():
        try:
            result = fn()
        except BaseException as e:   # re-raised below on rank 0 after the others have been told
            failure = f"{type(e).__name__}: {e}"
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            raise
    box = [failure]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise RankStopped(f"rank 0 stopped while {what} ({box[0].splitlines()[0]})")
    return result


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
    """Average every parameter's gradient across ranks, in one all-reduce per dtype (a call per tensor
    costs a round trip each: for the embedded student that was slower than the step itself)."""
    if not active():
        return
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


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


def stop_on_sigterm(out_dir) -> None:
    """A rank that its launcher stops (torchrun sends SIGTERM to the others when one rank dies) says so in
    one line and exits, instead of vanishing without a word."""
    import signal
    import sys

    if not active():
        return

    def stop(signum, frame):
        if _STOPPING:
            os._exit(143)
        print(f"error: rank {rank()} stopped by its launcher (another rank failed); the last saved state in "
              f"{out_dir} is intact: run the same command again to resume", file=sys.stderr, flush=True)
        os._exit(143)

    signal.signal(signal.SIGTERM, stop)


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
