"""``RayExecutor``: rollout workers as Ray actors, behind the same interface as ``LocalExecutor``.

Ray is imported only by the ``rl/ray_*.py`` modules (docs/ray.md): this one (rollout workers),
``rl/ray_cluster.py`` (start or join the job's one cluster, token auth, dashboard, metrics endpoint) and
``rl/ray_trainers.py`` (trainer ranks as Ray actors).

* Cluster: ``ray_cluster.init_ray`` (a private loopback-bound local cluster sized for the workers, or
  ``train.ray_address``; a process where Ray is already initialised is reused as it is). Only a cluster
  this executor started is shut down by ``shutdown()``.
* Workers: one named actor ``marval-rl-worker-<i>`` per worker (``RolloutWorker(spec, i)``, ``num_cpus =
  train.worker_threads``).
* Weights: ``set_weights`` puts the ``PolicyWeights`` into the object store once and hands the same
  ObjectRef to every actor; every actor verifies the checksum (``StaleWeightsError`` otherwise).
* Faults: an actor that dies (``RayActorError`` / ``ActorDiedError``, a crashed worker process) is
  replaced by a new actor with the same worker id, brought to the current weights, and its calls are
  redone, at most ``max_retries`` times per call. Errors raised *inside* a worker (a stale request,
  bad weights, a NaN reward) are not faults of the process and propagate unchanged.
* Metrics: ``report(metrics)`` sets ``ray.util.metrics`` gauges (``marval_rl_rollouts_per_s``,
  ``marval_rl_reward_mean``, ``marval_rl_version_lag``, ``marval_rl_policy_version``,
  ``marval_rl_worker_replacements``, and ``marval_rl_gold_reward_mean`` tagged ``reward=<label>``),
  exported by Ray's metrics agent to Prometheus with a ``ray_`` prefix.
* Names: actors ``marval-rl-worker-<i>`` whose repr (the dashboard's Actors "Repr" column) is
  ``RolloutWorker(id=<i>, policy_version=<v>)``.
"""
from __future__ import annotations

import copy
import math
import uuid
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, WorkerCrashedError

from marval_rl.config import TrainSection
from marval_rl.rl.batch import PolicyWeights, RolloutBatch, RolloutRequest
from marval_rl.rl import ray_cluster
from marval_rl.rl.ray_cluster import (DEFAULT_DASHBOARD_PORT, LOOPBACK, _is_loopback, _precreate_private_token,  # noqa: F401
                                      _private_token_file, auth_headers, auth_token, auth_token_path, dashboard_help,
                                      init_ray, private_working_dir, prometheus_url, token_auth_enabled,
                                      kill_actors, write_prometheus_config)   # (re-exported: their old home)
from marval_rl.rl.rollout import RolloutWorker, WorkerSpec

ACTOR_PREFIX = "marval-rl-worker"
# the worker process died under the call (SIGKILL, OOM kill, segfault, node lost)
_WORKER_DIED = (RayActorError, WorkerCrashedError)

# report() key -> (gauge name, description)
GAUGES = {
    "rollouts_per_s": ("marval_rl_rollouts_per_s", "Rollouts (images) per second of the last iteration"),
    "reward/total": ("marval_rl_reward_mean", "Mean optimised reward of the last iteration's rollouts"),
    "version_lag": ("marval_rl_version_lag", "Policy versions between the rollouts and the trainer"),
    "version": ("marval_rl_policy_version", "Policy version held by the trainer"),
    "replacements": ("marval_rl_worker_replacements", "Rollout workers replaced after dying, in total"),
}
# the held-out rewards of the last iteration's rollouts, one series per gold reward (tag "reward")
GOLD_GAUGE = ("marval_rl_gold_reward_mean", "Mean gold (held-out, never optimised) reward of the last iteration")



def _absolute_paths(spec: WorkerSpec) -> WorkerSpec:
    """Local files named relative to the driver's directory, made absolute (an actor's cwd may differ
    when joining a cluster started elsewhere). Names that are not existing files are left alone."""
    spec = copy.deepcopy(spec)
    for sec in (spec.model, spec.vae):
        if sec.checkpoint and Path(sec.checkpoint).exists():
            sec.checkpoint = str(Path(sec.checkpoint).resolve())
    for r in list(spec.rewards) + list(spec.gold):
        path, sep, cls = r.name.rpartition(":")
        if sep and path.endswith(".py") and Path(path).is_file():
            r.name = f"{Path(path).resolve()}:{cls}"
    return spec


# ---------------------------------------------------------------------------------------------- executor
class RayExecutor:
    """``num_workers`` ``RolloutWorker`` actors; the interface of ``controller.LocalExecutor``."""

    def __init__(self, spec: WorkerSpec, num_workers: int, section: TrainSection,
                 max_retries: int = 3, startup_timeout_s: float = 600.0, job_name: str | None = None,
                 reserved_gpus: float = 0.0):
        """``reserved_gpus``: GPUs of the cluster kept for others (the trainer ranks); the workers share the rest."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.spec, self.section, self.num_workers = _absolute_paths(spec), section, num_workers
        self.max_retries, self.startup_timeout_s = max_retries, startup_timeout_s
        self.replacements, self.reserved_gpus = 0, reserved_gpus
        self._weights: PolicyWeights | None = None
        self._weights_ref = None
        self._generation = [0] * num_workers
        self.names: list[str] = [""] * num_workers
        self.workers: list = []
        self._closed = False
        self._owns_ray, self.dashboard_url = init_ray(section, num_workers * max(1, section.worker_threads),
                                                      job_name=job_name)
        for line in dashboard_help(self.dashboard_url):
            print(line)
        try:
            self._actor_cls = ray.remote(num_cpus=section.worker_threads, num_gpus=self._gpus_per_worker(),
                                         max_restarts=0)(RolloutWorker)
            self.workers = [self._spawn(i) for i in range(num_workers)]
            self._wait_ready(list(range(num_workers)))
            self._gauges = self._make_gauges()
        except BaseException:
            self.shutdown()
            raise

    # -------------------------------------------------------------- actors
    def _gpus_per_worker(self) -> float:
        """CUDA workers must reserve GPUs (Ray hides the GPUs from actors that reserve none); workers
        share them when there are more workers than GPUs. Ray maps each actor's GPU to ``cuda``."""
        if not str(self.spec.device).startswith("cuda"):
            return 0
        total = ray.cluster_resources().get("GPU", 0) - self.reserved_gpus
        if total <= 0:
            raise RuntimeError(f"device is {self.spec.device} but the Ray cluster has no GPUs"
                               + (f" left for the rollout workers ({self.reserved_gpus:g} kept for the trainer ranks)"
                                  if self.reserved_gpus else ""))
        self.spec.device = "cuda"
        return min(1.0, math.floor(total / self.num_workers * 1e4) / 1e4)  # Ray takes 4 decimals at most

    def _spawn(self, i: int):
        g = self._generation[i]
        name = f"{ACTOR_PREFIX}-{i}" if g == 0 else f"{ACTOR_PREFIX}-{i}-r{g}"
        try:
            handle = self._actor_cls.options(name=name).remote(self.spec, i)
        except ValueError:  # name taken (another executor in this job): stay readable, add a tag
            name = f"{name}-{uuid.uuid4().hex[:6]}"
            handle = self._actor_cls.options(name=name).remote(self.spec, i)
        self.names[i] = name
        return handle

    @staticmethod
    def _why(err: BaseException) -> str:
        """One line for an actor's death: for a constructor that raised, the worker's own exception
        (``CheckpointError: could not read ...``) without the remote traceback; else Ray's text, joined."""
        import re

        lines = [x.rstrip() for x in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if x.strip()]
        for i in range(len(lines) - 1, 0, -1):
            m = re.match(r"([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\w*): (.*)", lines[i])
            if m:
                rest = " ".join(x.strip() for x in lines[i + 1:])
                return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}" + (f" {rest}" if rest else "")
        return " ".join(x.strip() for x in lines) or type(err).__name__

    def _wait_ready(self, slots: list[int]) -> None:
        """Block until the actors in ``slots`` have built their worker (model, VAE, rewards)."""
        refs = [self.workers[i].pid.remote() for i in slots]
        try:
            ray.get(refs, timeout=self.startup_timeout_s)
        except GetTimeoutError:
            raise RuntimeError(
                f"rollout workers did not start within {self.startup_timeout_s:.0f} s; each needs "
                f"{self.section.worker_threads} CPU(s) and the cluster has {ray.available_resources().get('CPU', 0)} "
                f"free (lower train.num_workers / train.worker_threads)") from None
        except _WORKER_DIED as err:
            raise RuntimeError(f"a rollout worker failed to start: {self._why(err)}{ray_cluster._JOIN_HINT}") from err

    def _replace(self, i: int, reason: BaseException, restore) -> None:
        """A new actor for worker id ``i`` (the old one died). ``restore`` = (weights ObjectRef, version)
        to load first; calls to one actor run in submission order, so it holds them before any redo."""
        old_name = self.names[i]
        try:
            ray.kill(self.workers[i], no_restart=True)
        except Exception:
            pass
        self._generation[i] += 1
        self.replacements += 1
        self.workers[i] = self._spawn(i)
        if restore is not None:
            self.workers[i].set_weights.remote(restore[0])
        text = str(reason).strip()
        first = text.splitlines()[0][:160] if text else ""
        print(f"[ray] rollout worker {i} ({old_name}) died ({type(reason).__name__}: {first}); replaced by "
              f"{self.names[i]}" + (f" at policy version {restore[1]}" if restore is not None else "")
              + ", redoing its work")

    def _gather(self, jobs: list[tuple[int, Callable]], restore) -> list:
        """Run ``fn(actor)`` for each (worker slot, fn); results in job order. A job whose actor dies
        is redone on a replacement actor (which first loads ``restore``), up to ``max_retries`` times."""
        results: list = [None] * len(jobs)
        attempts = [0] * len(jobs)
        pending: dict = {}

        def submit(j: int) -> None:
            slot, fn = jobs[j]
            handle = self.workers[slot]
            pending[fn(handle)] = (j, handle)

        for j in range(len(jobs)):
            submit(j)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            j, handle = pending.pop(done[0])
            try:
                results[j] = ray.get(done[0])
            except _WORKER_DIED as err:
                slot = jobs[j][0]
                if getattr(err, "actor_init_failed", False):
                    raise RuntimeError(f"rollout worker {slot} could not be built: {self._why(err)}") from err
                attempts[j] += 1
                if attempts[j] > self.max_retries:
                    raise RuntimeError(f"rollout worker {slot} died {attempts[j]} times on the same call; "
                                       f"giving up (last error: {self._why(err)})") from err
                if self.workers[slot] is handle:  # first failure seen from this actor: replace it
                    self._replace(slot, err, restore)
                # (its other queued calls fail the same way and land here too, then go to the new actor)
                submit(j)
        return results

    def _restore(self):
        return None if self._weights_ref is None else (self._weights_ref, self._weights.version)

    # -------------------------------------------------------------- executor interface
    def set_weights(self, weights: PolicyWeights) -> None:
        """One ``ray.put`` of the weights; every actor loads them from the same ObjectRef."""
        ref = ray.put(weights)
        versions = self._gather([(i, lambda h: h.set_weights.remote(ref)) for i in range(self.num_workers)],
                                restore=None)  # a replacement simply gets this call again
        bad = [v for v in versions if v != weights.version]
        if bad:
            raise RuntimeError(f"workers report versions {versions} after set_weights({weights.version})")
        self._weights, self._weights_ref = weights, ref

    def rollout(self, requests: list[RolloutRequest]) -> list[RolloutBatch]:
        """Request i on worker i mod N; batches in request order."""
        if self._weights_ref is None:
            raise RuntimeError("set_weights() must come before rollout()")
        jobs = [(k % self.num_workers, (lambda r: (lambda h: h.rollout.remote(r)))(req))
                for k, req in enumerate(requests)]
        return self._gather(jobs, restore=self._restore())

    def pids(self) -> list[int]:
        """OS pids of the worker actors (a dead one is replaced first)."""
        return self._gather([(i, lambda h: h.pid.remote()) for i in range(self.num_workers)],
                            restore=self._restore())

    # -------------------------------------------------------------- metrics
    def _make_gauges(self) -> dict:
        try:
            from ray.util.metrics import Gauge

            gauges = {k: Gauge(name, description=desc) for k, (name, desc) in GAUGES.items()}
            gauges[GOLD_GAUGE[0]] = Gauge(GOLD_GAUGE[0], description=GOLD_GAUGE[1], tag_keys=("reward",))
            return gauges
        except Exception as err:  # e.g. a ray:// client driver
            print(f"[ray] custom metrics unavailable here ({type(err).__name__}: {err})")
            return {}

    def report(self, metrics: dict) -> None:
        """Set the dashboard/Prometheus gauges from one iteration's metrics (gold rewards as one gauge
        tagged with the reward's label: ``marval_rl_gold_reward_mean{reward="classifier"}``)."""
        values = {**metrics, "replacements": self.replacements}
        gauges = getattr(self, "_gauges", {})
        for key, gauge in gauges.items():
            v = values.get(key)
            if key in GAUGES and isinstance(v, (int, float)) and math.isfinite(v):
                gauge.set(float(v))
        gold = gauges.get(GOLD_GAUGE[0])
        for key, v in values.items():
            if gold is not None and key.startswith("gold/") and isinstance(v, (int, float)) and math.isfinite(v):
                gold.set(float(v), tags={"reward": key[len("gold/"):]})

    def shutdown(self) -> None:
        """Kill the actors; stop Ray only if this executor started it."""
        if self._closed:
            return
        self._closed = True
        kill_actors(self.workers)
        self.workers = []
        self._weights_ref = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
