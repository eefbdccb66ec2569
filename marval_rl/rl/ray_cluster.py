"""The Ray cluster of one ``marval-rl train`` job: start or join it, token auth, dashboard, metrics endpoint.

Shared by the rollout workers (``rl/ray_executor.py``) and the trainer ranks (``rl/ray_trainers.py``); with
them, the only modules of marval-rl that import Ray (docs/ray.md).

* ``init_ray``: ``ray.init(address="local", ...)`` starts a private local cluster with the dashboard on
  ``train.dashboard_host`` (127.0.0.1 by default) and every other service on 127.0.0.1 (``_loopback_node``;
  docs/ray.md "What listens where"); ``train.ray_address`` ("auto", "host:6379", "ray://host:10001") joins
  an existing one; a process where Ray is already initialised is reused as it is.
* One cluster per job, under ``torchrun`` too: when the process group is up (WORLD_SIZE > 1) and no
  ``train.ray_address`` is given, rank 0 starts the local cluster (sized for every rank's workers) and
  broadcasts its address; the other ranks join it. Ranks on other nodes cannot reach a loopback cluster, so
  a multi-node ``torchrun`` needs ``train.ray_address`` (then every rank joins that cluster).
"""
from __future__ import annotations

import logging
import contextlib
import os
import socket
import tempfile
from pathlib import Path

import ray

from marval_rl.config import TrainSection

DEFAULT_DASHBOARD_PORT = 8265


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


@contextlib.contextmanager
def _empty_cwd():
    """Start the cluster's processes (GCS, raylet, the dashboard and its helpers, some run as
    ``python -c`` with '' first on sys.path) in the empty private directory, not in the launch directory:
    a ``logging.py`` or ``ray.py`` there must never run inside the cluster."""
    here = os.getcwd()
    os.chdir(private_working_dir()["working_dir"])
    try:
        yield
    finally:
        os.chdir(here)


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
    ``job_name``: the run's name in the dashboard's Jobs table (the output folder's name).

    Under torchrun without ``train.ray_address``: rank 0 starts the one local cluster (``num_cpus`` per
    rank) and the other ranks join it at the address rank 0 broadcasts; one cluster per job."""
    if ray.is_initialized():
        return False, _dashboard_url()
    from marval_rl import distributed

    rank, world = distributed.rank(), distributed.world_size()
    if world > 1 and not section.ray_address:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local_world != world:
            raise RuntimeError(f"torchrun across nodes ({world} ranks, {local_world} on this node) with Ray rollout "
                               f"workers needs train.ray_address: a cluster every node reaches (`ray start --head` "
                               f"on one node, `ray start --address ...` on the others; docs/ray.md)")
        if rank == 0:
            try:
                started = _init_here(section, num_cpus * world, job_name)
            except BaseException:
                distributed.broadcast_object(None)   # the other ranks stop too, instead of waiting for an address
                raise
            distributed.broadcast_object(ray.get_runtime_context().gcs_address)
            return started
        address = distributed.broadcast_object(None)
        if not address:
            raise RuntimeError("torchrun rank 0 could not start the job's Ray cluster (its error is above)")
        _token_auth_for_join(address)
        with _loopback_node():   # rank 0's services are on its node IP (127.0.0.1): this driver's too
            ctx = ray.init(address=address, _node_ip_address=address.rpartition(":")[0].strip("[]"),
                           **_job_options(job_name))
        print(f"[ray] torchrun rank {rank} joined rank 0's cluster at {address}")
        return False, getattr(ctx, "dashboard_url", None) or _dashboard_url()
    return _init_here(section, num_cpus, job_name)


def _init_here(section: TrainSection, num_cpus: int, job_name: str | None) -> tuple[bool, str | None]:
    """``init_ray`` for one driver: join ``train.ray_address``, or start the private local cluster."""
    quiet = _job_options(job_name)
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
    with _loopback_node(), _empty_cwd():
        ctx = ray.init(address="local", num_cpus=max(1, int(num_cpus)), include_dashboard=True,
                       dashboard_host=host, dashboard_port=port or None, _node_ip_address=LOOPBACK, **quiet)
    _private_token_file()
    node_ip = _node_ip()
    if node_ip and not _is_loopback(node_ip):  # a Ray version that ignores the loopback request: say so
        print(f"[ray] note: this Ray put the local cluster's services on {node_ip}, not {LOOPBACK}; they are "
              f"reachable from other hosts (token auth guards them; docs/ray.md)")
    return True, getattr(ctx, "dashboard_url", None) or _dashboard_url()


LOOPBACK = "127.0.0.1"


def _job_options(job_name: str | None) -> dict:
    from ray.job_config import JobConfig

    return dict(logging_level=logging.WARNING, log_to_driver=True, runtime_env=private_working_dir(),
                job_config=JobConfig(metadata={"job_name": job_name} if job_name else {}))


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


def kill_actors(handles) -> None:
    """Kill Ray actors for good (no restart); one already gone is fine."""
    for h in handles:
        try:
            ray.kill(h, no_restart=True)
        except Exception:   # already dead, or its node is gone: nothing left to stop
            pass
