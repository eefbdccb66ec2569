"""Trainer ranks as Ray actors (``train.trainer_ranks`` > 1): data-parallel updates inside the job's one Ray cluster.

Engine: an actor group driven by the single controller (the way verl drives its ``RayWorkerGroup``), not
Ray Train's ``TorchTrainer``. ``TorchTrainer.fit()`` owns the training loop (``train_loop_per_worker``
runs the whole run on the workers and reports back through ``ray.train.report``); the controller of
``marval-rl train`` owns the loop instead (weights out, rollouts in, one update, eval, checkpoint), so
under TorchTrainer it would have to move inside the workers or talk to them through queues, and its
checkpoints would go through Ray Train's storage rather than the controller's atomic ``rl_state.pt``.
It also needs the ``ray[train]`` extra. The actor group needs nothing beyond Ray core and
``torch.distributed``, and each update is one method call per rank.

    controller (driver)                         TrainerRank actors 0..N-1 (torch.distributed, gloo / nccl)
    batches = rollout workers' RolloutBatches
    shares  = split(batches)   -- contiguous, equal ---> rank r: RLTrainer.update(shares[r])
                                                        backward; average_gradients (all-reduce); step
    metrics <------------------ rank 0 (reduce_stats: means, maxima over ranks)
    weights / state <---------- rank 0 (every rank holds identical weights; check_in_sync each step)
    load_state_dict ----------> every rank (resume)

* Fixed global batch: the iteration's ``num_workers`` rollout batches are split into ``trainer_ranks``
  contiguous shares of equal size (``num_workers`` must be a multiple of ``trainer_ranks``), so the averaged
  gradient is the gradient of the 1-rank update on the same batches (up to summation order); the reward
  scale is the std over the global batch (``distributed.all_cat``).
* Rendezvous: rank 0 picks a free TCP port on its node's IP; every rank calls ``init_process_group``
  with ``tcp://ip:port`` (gloo on CPU, nccl on CUDA with one GPU per rank).
* Only the controller writes (logs, grids, checkpoints, the policy): the ranks return numbers and
  state, never touch the output folder.
* A rank that dies or raises stops the run (its checkpoint resumes it); the others are killed rather than
  left waiting in an all-reduce.
"""
from __future__ import annotations

import copy
import os
import socket
import time
import uuid

import ray
from ray.exceptions import GetTimeoutError

from marval_rl.rl.batch import PolicyWeights, RolloutBatch
from marval_rl.rl.ray_cluster import kill_actors

ACTOR_PREFIX = "marval-rl-trainer"


def needs(recipe) -> tuple[int, int, int]:
    """(trainer CPUs, rollout CPUs, trainer GPUs) that the job reserves in the cluster."""
    s = recipe.train
    cuda = str(recipe.device).startswith("cuda")
    return s.trainer_ranks * s.trainer_threads, s.num_workers * s.worker_threads, s.trainer_ranks if cuda else 0


def check_cluster(recipe, resources: dict) -> None:
    """The trainer ranks (and the rollout workers beside them) must fit the cluster: a ValueError naming
    the numbers otherwise (an actor that does not fit would wait forever)."""
    s = recipe.train
    train_cpus, roll_cpus, gpus = needs(recipe)
    have_cpu, have_gpu = resources.get("CPU", 0), resources.get("GPU", 0)
    if gpus:
        if gpus > have_gpu:
            raise ValueError(f"train.trainer_ranks={s.trainer_ranks} exceeds the {have_gpu:g} GPUs of the Ray "
                             f"cluster (one GPU per trainer rank)")
        if gpus >= have_gpu:
            raise ValueError(f"train.trainer_ranks={s.trainer_ranks} takes all {have_gpu:g} GPUs of the Ray cluster "
                             f"and leaves none for the {s.num_workers} rollout workers; use at most "
                             f"{int(have_gpu) - 1} trainer ranks")
    if train_cpus > have_cpu:
        raise ValueError(f"train.trainer_ranks={s.trainer_ranks} x train.trainer_threads={s.trainer_threads} = "
                         f"{train_cpus} CPUs exceeds the {have_cpu:g} CPUs of the Ray cluster")
    if train_cpus + roll_cpus > have_cpu:
        raise ValueError(f"trainer ranks ({train_cpus} CPUs) + rollout workers (train.num_workers x "
                         f"train.worker_threads = {roll_cpus} CPUs) need {train_cpus + roll_cpus} CPUs; the Ray "
                         f"cluster has {have_cpu:g}")


def start_cluster(recipe, job_name: str | None = None) -> bool:
    """The job's one cluster, sized (local) or checked (joined) for trainer ranks + rollout workers.
    Returns whether it was started here (then ``TrainerGroup.shutdown`` stops it)."""
    from marval_rl.rl.ray_cluster import init_ray

    train_cpus, roll_cpus, _ = needs(recipe)
    owns, _ = init_ray(recipe.train, train_cpus + roll_cpus, job_name=job_name)
    try:
        check_cluster(recipe, ray.cluster_resources())
    except BaseException:
        if owns:
            ray.shutdown()
        raise
    return owns


def split(batches: list[RolloutBatch], ranks: int) -> list[list[RolloutBatch]]:
    """Contiguous equal shares in batch order (groups never straddle ranks: a batch holds whole groups)."""
    if len(batches) % ranks:
        raise ValueError(f"{len(batches)} rollout batches do not split evenly over {ranks} trainer ranks")
    k = len(batches) // ranks
    return [batches[r * k:(r + 1) * k] for r in range(ranks)]


class TrainerRank:
    """One data-parallel trainer rank: an ``RLTrainer`` replica in its own process group."""

    def __init__(self, recipe, rank: int, world_size: int, backend: str):
        import torch

        self.recipe, self.rank, self.world_size, self.backend = copy.deepcopy(recipe), rank, world_size, backend
        torch.set_num_threads(max(1, recipe.train.trainer_threads))
        if str(recipe.device).startswith("cuda"):
            self.recipe.device = "cuda"   # Ray shows this actor its own GPU only
        self.trainer = None

    def __repr__(self):
        v = None if self.trainer is None else self.trainer.version
        return f"TrainerRank(rank={self.rank}/{self.world_size}, policy_version={v})"

    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a free TCP port on it (rank 0's, for every rank's init_process_group)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup(self, host: str, port: int) -> int:
        from marval_rl.rl.controller import build_trainer
        from marval_rl.distributed import init_group

        init_group(self.rank, self.world_size, host, port, self.backend)
        self.trainer = build_trainer(self.recipe)
        return os.getpid()

    def update(self, batches: list[RolloutBatch]) -> dict:
        from marval_rl.distributed import reduce_stats

        t0 = time.perf_counter()
        stats = self.trainer.update(batches)
        stats["time/update_rank"] = time.perf_counter() - t0   # compute + all-reduce, without the transfer
        return {**reduce_stats(stats), "version": self.trainer.version}

    def weights(self, averaged: bool = False) -> PolicyWeights:
        return self.trainer.weights(averaged)

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict) -> int:
        self.trainer.load_state_dict(state)
        return self.trainer.version

    def final_policy(self):
        return self.trainer.final_policy().to("cpu")


class TrainerGroup:
    """``trainer_ranks`` ``TrainerRank`` actors behind the interface the controller uses of ``RLTrainer``
    (``version``, ``weights``, ``update``, ``state_dict``, ``load_state_dict``, ``final_policy``)."""

    def __init__(self, recipe, owns_ray: bool = False, startup_timeout_s: float = 600.0):
        s = recipe.train
        self.ranks, self.owns_ray, self.version = s.trainer_ranks, owns_ray, 0
        cuda = str(recipe.device).startswith("cuda")
        backend = "nccl" if cuda and os.environ.get("MARVAL_DIST_BACKEND") != "gloo" else "gloo"
        cls = ray.remote(num_cpus=s.trainer_threads, num_gpus=1 if cuda else 0, max_restarts=0)(TrainerRank)
        self.actors = []
        try:
            tag = ""
            for r in range(self.ranks):
                try:
                    self.actors.append(cls.options(name=f"{ACTOR_PREFIX}-{r}{tag}").remote(recipe, r, self.ranks,
                                                                                          backend))
                except ValueError:   # name taken (an earlier group of this job): stay readable, add a tag
                    tag = f"-{uuid.uuid4().hex[:6]}"
                    self.actors.append(cls.options(name=f"{ACTOR_PREFIX}-{r}{tag}").remote(recipe, r, self.ranks,
                                                                                          backend))
            host, port = ray.get(self.actors[0].rendezvous.remote(), timeout=startup_timeout_s)
            self.pids = self._all([a.setup.remote(host, port) for a in self.actors], startup_timeout_s)
            print(f"[ray] {self.ranks} trainer ranks ({backend}, rendezvous tcp://{host}:{port}), pids {self.pids}")
        except GetTimeoutError:
            self.shutdown()
            raise RuntimeError(f"trainer ranks did not start within {startup_timeout_s:.0f} s; each needs "
                               f"{s.trainer_threads} CPU(s){' and 1 GPU' if cuda else ''}; the cluster has "
                               f"{ray.available_resources()} free") from None
        except BaseException:
            self.shutdown()
            raise

    def _all(self, refs: list, timeout: float | None = None) -> list:
        """Results in rank order; the first failure raises at once (the other ranks may be stuck in a
        collective waiting for the failed one, so the caller's shutdown kills them)."""
        pending, deadline = list(refs), None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                raise GetTimeoutError(f"{len(pending)} trainer ranks did not answer")
            ray.get(done[0])    # raises the rank's error (RayTaskError / ActorDiedError)
        return ray.get(refs)

    def update(self, batches: list[RolloutBatch]) -> dict:
        """One data-parallel update at a fixed global batch: rank r gets share r of ``batches``."""
        out = self._all([a.update.remote(share) for a, share in zip(self.actors, split(batches, self.ranks))])
        stats = dict(out[0])
        self.version = int(stats.pop("version"))
        return stats

    def weights(self, averaged: bool = False) -> PolicyWeights:
        return ray.get(self.actors[0].weights.remote(averaged))

    def state_dict(self) -> dict:
        return ray.get(self.actors[0].state_dict.remote())

    def load_state_dict(self, state: dict) -> None:
        ref = ray.put(state)
        versions = self._all([a.load_state_dict.remote(ref) for a in self.actors])
        self.version = versions[0]

    def final_policy(self):
        return ray.get(self.actors[0].final_policy.remote())

    def shutdown(self) -> None:
        """Kill the ranks; stop Ray if the cluster was started for this job here."""
        kill_actors(self.actors)
        self.actors = []
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False
