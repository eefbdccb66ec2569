"""``RayExecutor``: rollout workers as Ray actors, behind the same interface as ``LocalExecutor``.

This is the only module of marval-rl that imports Ray (docs/ray.md).

* Cluster: ``ray.init(address="local", ...)`` starts a private local cluster sized for the workers
  (``num_workers x worker_threads`` CPUs) with the dashboard on ``train.dashboard_host`` (127.0.0.1 by
  default) and every other service of it on 127.0.0.1 (``_loopback_node``; docs/ray.md "What listens
  where"); ``train.ray_address`` ("auto", "host:6379", "ray://host:10001") joins an existing one; a
  process where Ray is already initialised is reused as it is. Only a cluster this executor started
  is shut down by ``shutdown()``.
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
import logging
import math
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, WorkerCrashedError

from marval_rl.config import TrainSection
from marval_rl.rl.batch import PolicyWeights, RolloutBatch, RolloutRequest
from marval_rl.rl.rollout import RolloutWorker, WorkerSpec

ACTOR_PREFIX = "marval-rl-worker"
DEFAULT_DASHBOARD_PORT = 8265
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


# ---------------------------------------------------------------------------------------------- auth
def auth_token_path() -> Path:
    """Where Ray keeps the dashboard/cluster token: ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def auth_token() -> str | None:
    """The token Ray uses (``$RAY_AUTH_TOKEN`` first, then the token file), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    p = auth_token_path()
    return p.read_text().strip() if p.is_file() else None


def token_auth_enabled() -> bool:
    """Whether this process runs Ray with token auth (Ray 2.60 turns it on for new local clusters)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return bool(is_token_auth_enabled())
    except Exception:  # older Ray: no token auth
        return False


def auth_headers() -> dict[str, str]:
    """HTTP headers for the dashboard's REST API (empty when token auth is off)."""
    tok = auth_token() if token_auth_enabled() else None
    return {"Authorization": f"Bearer {tok}"} if tok else {}


def dashboard_help(url: str | None) -> list[str]:
    """The lines printed at start: where the dashboard is and how to get past its token auth."""
    if not url:
        return ["[ray] no dashboard (needs ray[default]; include_dashboard is on by default)"]
    url = url if url.startswith("http") else f"http://{url}"
    lines = [f"[ray] dashboard: {url}"]
    if token_auth_enabled():
        where = "$RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else str(auth_token_path())
        lines.append(f"[ray] token auth is on: paste the token from {where} (`ray get-auth-token`) into the "
                     f"dashboard's login prompt, or send 'Authorization: Bearer <token>'; "
                     f"RAY_AUTH_MODE=disabled opts out (docs/ray.md)")
    return lines


# ---------------------------------------------------------------------------------------------- init
def _port_free(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray's own check (TIME_WAIT is free)
            s.bind((host, port))
        return True
    except OSError:
        return False


def private_working_dir() -> dict:
    """The job's runtime_env: an empty working directory of its own for every worker.

    Ray puts the driver's current directory first on every worker's ``sys.path`` and starts the
    workers in it, unless the job has a ``working_dir``; then the workers start in (and import from)
    that directory instead. An empty one means nothing in the directory ``marval-rl`` was launched
    from (a ``rewards/``, a ``torch.py``) is importable in a worker; paths in the worker spec are
    made absolute first (``_absolute_paths``)."""
    global _EMPTY_DIR
    if _EMPTY_DIR is None or not Path(_EMPTY_DIR).is_dir():
        _EMPTY_DIR = tempfile.mkdtemp(prefix="marval-rl-worker-cwd-")
    return {"working_dir": _EMPTY_DIR}


_EMPTY_DIR: str | None = None


def init_ray(section: TrainSection, num_cpus: int, job_name: str | None = None) -> tuple[bool, str | None]:
    """Initialise Ray for the controller. Returns (started a local cluster here?, dashboard URL or None).
    ``job_name``: the run's name in the dashboard's Jobs table (the output folder's name)."""
    if ray.is_initialized():
        return False, _dashboard_url()
    from ray.job_config import JobConfig

    quiet = dict(logging_level=logging.WARNING, log_to_driver=True, runtime_env=private_working_dir(),
                 job_config=JobConfig(metadata={"job_name": job_name} if job_name else {}))
    if section.ray_address:
        _check_reachable(section.ray_address)
        _token_auth_for_join(section.ray_address)
        try:
            ctx = ray.init(address=section.ray_address, **quiet)
        except Exception as err:
            text = repr(err) + repr(err.__cause__)
            if "AuthToken" in text or "Authentication" in text:
                raise RuntimeError(
                    f"could not join the Ray cluster at {section.ray_address}: token auth refused. Give this run "
                    f"the cluster's token ({auth_token_path()} or RAY_AUTH_TOKEN) with RAY_AUTH_MODE=token, or "
                    f"use RAY_AUTH_MODE=disabled on both sides (docs/ray.md)") from err
            raise
        _private_token_file()
        return False, getattr(ctx, "dashboard_url", None) or _dashboard_url()
    host, port = section.dashboard_host or "127.0.0.1", section.dashboard_port
    if host in ("0.0.0.0", "::"):
        print(f"[ray] note: the dashboard listens on every interface ({host}) as train.dashboard_host asks")
    if port and not _port_free(host, port):
        # another Ray (or anything) holds the port: let Ray pick the next free one from 8265 on
        print(f"[ray] dashboard port {port} is in use; Ray picks a free port (printed below)")
        port = None
    # address="local": always a fresh private cluster, never someone's `ray start` cluster or $RAY_ADDRESS;
    # every service of it on loopback (_loopback_node, docs/ray.md "What listens where")
    _precreate_private_token()
    with _loopback_node():
        ctx = ray.init(address="local", num_cpus=max(1, int(num_cpus)), include_dashboard=True,
                       dashboard_host=host, dashboard_port=port or None, _node_ip_address=LOOPBACK, **quiet)
    _private_token_file()
    node_ip = _node_ip()
    if node_ip and not _is_loopback(node_ip):  # a Ray version that ignores the loopback request: say so
        print(f"[ray] note: this Ray put the local cluster's services on {node_ip}, not {LOOPBACK}; they are "
              f"reachable from other hosts (token auth guards them; docs/ray.md)")
    return True, getattr(ctx, "dashboard_url", None) or _dashboard_url()


LOOPBACK = "127.0.0.1"


class _loopback_node:
    """Context for ``ray.init(address="local", _node_ip_address="127.0.0.1")`` that Ray honours.

    Ray 2.60 replaces a loopback ``_node_ip_address`` by the machine's routable address
    (``services.resolve_ip_for_localhost``) unless ``ray_constants.ENABLE_RAY_CLUSTER`` is False, which
    is Ray's own default on macOS/Windows ("local Ray only") and is read only there, at call time.
    With the node IP on loopback every service binds to 127.0.0.1: GCS, raylet (node manager, object
    manager), the workers' and the driver's gRPC servers, the dashboard agent (gRPC, HTTP, Prometheus
    metrics export), the runtime-env agent, and the dashboard's and autoscaler's Prometheus endpoints
    (ports 44227, 44217). The flag is set only while ``ray.init`` runs (the processes it starts get the
    node IP on their command line) and is restored afterwards."""

    def __enter__(self):
        from ray._private import ray_constants

        self._consts = ray_constants
        self._saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
        if self._saved is not None:
            ray_constants.ENABLE_RAY_CLUSTER = False
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            self._consts.ENABLE_RAY_CLUSTER = self._saved
        return False


def _is_loopback(ip: str) -> bool:
    import ipaddress

    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return ip == "localhost"
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as an IPv6 socket reports loopback
    return (mapped or addr).is_loopback


def _node_ip() -> str | None:
    try:
        return ray._private.worker.global_worker.node.node_ip_address
    except Exception:
        return None


def _precreate_private_token() -> None:
    """Create the token Ray would generate for a new local cluster, but with mode 0600 from the
    first byte: Ray writes ``~/.ray/auth_token`` with ``open(path, "w")`` (0644 under the usual umask).
    Only when Ray would generate it: token mode on or unset (Ray 2.60 turns it on for new local
    clusters), no ``$RAY_AUTH_TOKEN``/``$RAY_AUTH_TOKEN_PATH``, no token file yet."""
    if (os.environ.get("RAY_AUTH_MODE") or "token").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"  # Ray's own default path (authentication_token_setup)
    if path.exists():
        return
    try:
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token)
    except ImportError:  # Ray without token auth
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # created meanwhile, or not writable: Ray deals with it; _private_token_file() after
        return
    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())


def _private_token_file() -> None:
    """The token file (``auth_token_path()``) readable by its owner only (0600), if this user owns it."""
    path = auth_token_path()
    try:
        st = path.stat()
        if path.is_file() and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` cluster address must accept a TCP connection; Ray itself retries an unreachable
    GCS for minutes, printing warnings about another address."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise RuntimeError(f"train.ray_address={address}: no Ray cluster answers there ({type(e).__name__}: "
                           f"{e}); start one with `ray start --head` or leave train.ray_address empty") from None


_JOIN_HINT = ""


def _token_auth_for_join(address: str) -> None:
    """Ray 2.60 picks up the token file by itself only for ``address="auto"``; with an explicit
    "host:port" a driver without ``RAY_AUTH_MODE`` fails with InvalidAuthToken against a cluster that
    has token auth. Turn token mode on, as "auto" does, when a token is at hand and the user has not
    chosen a mode (a cluster started on this machine used the same token file)."""
    global _JOIN_HINT
    if address == "auto" or address.startswith("ray://") or os.environ.get("RAY_AUTH_MODE") is not None:
        return
    if not auth_token():
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # Ray without token auth
        return
    if maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
        _JOIN_HINT = (f" (token auth was turned on to join {address} because {auth_token_path()} exists; if "
                      f"that cluster runs without token auth, set RAY_AUTH_MODE=disabled for this run too)")


def _dashboard_url() -> str | None:
    try:
        from ray._private.worker import get_dashboard_url

        return get_dashboard_url() or None
    except Exception:
        return None


def prometheus_url() -> str | None:
    """This node's metrics agent endpoint (Prometheus text format), where the gauges appear with a
    ``ray_`` prefix ~10 s after ``report()`` (Ray's export interval). It answers without a token; on
    the local cluster it listens on 127.0.0.1 only."""
    try:
        node = ray._private.worker.global_worker.node
        ip = node.node_ip_address
        host = f"[{ip}]" if ":" in ip else ip  # an IPv6 node IP (::1) needs brackets in a URL
        return f"http://{host}:{node.metrics_export_port}/metrics"
    except Exception:
        return None


def write_prometheus_config(out: Path, job: str = "marval-rl") -> Path | None:
    """``OUTPUT_DIR/prometheus.yml``: a scrape config for this node's metrics endpoint, so the custom
    gauges can be graphed offline with a plain Prometheus (``prometheus --config.file=...``, then
    ``http://127.0.0.1:9090/graph?g0.expr=ray_marval_rl_reward_mean``; docs/ray.md)."""
    url = prometheus_url()
    if not url:
        return None
    from urllib.parse import urlparse

    target = urlparse(url).netloc
    text = (f"# written by marval-rl train: scrape Ray's metrics agent of this run's node (docs/ray.md)\n"
            f"global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n"
            f"scrape_configs:\n  - job_name: {job}\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
    from marval_rl.models.checkpoints import atomic_write

    path = Path(out) / "prometheus.yml"
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path


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
                 max_retries: int = 3, startup_timeout_s: float = 600.0, job_name: str | None = None):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.spec, self.section, self.num_workers = _absolute_paths(spec), section, num_workers
        self.max_retries, self.startup_timeout_s = max_retries, startup_timeout_s
        self.replacements = 0
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
        total = ray.cluster_resources().get("GPU", 0)
        if total <= 0:
            raise RuntimeError(f"device is {self.spec.device} but the Ray cluster has no GPUs")
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
            raise RuntimeError(f"a rollout worker failed to start: {self._why(err)}{_JOIN_HINT}") from err

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
        for h in self.workers:
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass
        self.workers = []
        self._weights_ref = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
