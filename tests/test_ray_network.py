"""The local Ray cluster that ``init_ray`` starts is reachable from this machine only: every TCP port
of its process tree listens on loopback, the Prometheus endpoints included, and the token file is
readable by its owner only (issue 11, item 8; docs/ray.md "What listens where")."""
import json
import os
import socket
import stat
import time
import urllib.request

import pytest

import ray  # noqa: E402  (a core dependency; it also puts its vendored psutil on sys.path)
import psutil  # noqa: E402

from marval_rl.config import TrainSection  # noqa: E402
from marval_rl.rl import ray_executor  # noqa: E402
from marval_rl.rl.ray_executor import (_is_loopback, auth_token_path, init_ray, prometheus_url,  # noqa: E402
                                       token_auth_enabled)

# Services that Ray 2.60 cannot put on loopback for a local cluster. Empty: with the node IP on
# 127.0.0.1 all of them bind there. A service proved unbindable would be listed here by name
# (process name, as psutil reports it), so that any *other* open port still fails the test.
ALLOWED_NON_LOOPBACK: set[str] = set()


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # another test module left Ray running: start from a clean slate
        ray.shutdown()
    started, url = init_ray(TrainSection(num_workers=1, worker_threads=1), num_cpus=1, job_name="marval-rl train: net")
    assert started and url

    @ray.remote(num_cpus=1)
    class Probe:  # an actor, so that worker processes (and their gRPC servers) exist
        def pid(self):
            return os.getpid()

    probe = Probe.remote()
    worker_pid = ray.get(probe.pid.remote(), timeout=60)
    yield {"url": url, "worker_pid": worker_pid}
    ray.shutdown()


def _tree():
    me = psutil.Process()
    return {p.pid: p for p in [me] + me.children(recursive=True)}


def _listening(procs):
    """(ip, port, pid, process name) of every listening TCP socket of the Ray process tree."""
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            try:
                name = procs[c.pid].name()
            except psutil.Error:
                name = "?"
            out.append((c.laddr.ip, c.laddr.port, c.pid, name))
    return out


def _wait_for_ports(ports, timeout=30.0):
    """The listening sockets once all of ``ports`` are up (the agents start a little after ray.init)."""
    deadline = time.time() + timeout
    while True:
        procs = _tree()
        socks = _listening(procs)
        if set(ports) <= {s[1] for s in socks} or time.time() > deadline:
            return procs, socks
        time.sleep(0.5)


def _external_ipv4():
    """This machine's non-loopback IPv4 addresses (what another host would connect to)."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def test_every_ray_port_listens_on_loopback(cluster):
    node = ray._private.worker.global_worker.node
    # the node itself is on loopback: catches Ray rewriting _node_ip_address=127.0.0.1 to the
    # machine's routable address (what Ray 2.60 does unless ENABLE_RAY_CLUSTER is off)
    assert _is_loopback(node.node_ip_address), node.node_ip_address
    # the flag is off only while ray.init runs: catches the patch leaking into the rest of the process
    from ray._private import ray_constants
    assert ray_constants.ENABLE_RAY_CLUSTER is True

    expected = [node.metrics_export_port, node.metrics_agent_port, node.runtime_env_agent_port,
                int(cluster["url"].rsplit(":", 1)[1])]
    procs, socks = _wait_for_ports([p for p in expected if p])
    names = {s[3] for s in socks}
    # the probe sees the whole cluster (GCS, raylet, an actor worker, the agents, the dashboard):
    # catches a test that passes because it looked at too few processes
    assert {"gcs_server", "raylet"} <= names, names
    assert cluster["worker_pid"] in procs and cluster["worker_pid"] in {s[2] for s in socks}, socks
    assert set(expected) - {0, None} <= {s[1] for s in socks}, (expected, socks)

    # every listening socket is on 127.0.0.1 / ::1 (or ::ffff:127.0.0.1, an IPv6 socket bound to
    # IPv4 loopback): catches any service on 0.0.0.0 / [::] / the external address -- the GCS, raylet
    # and worker gRPC servers on *:PORT, the dashboard agent on 0.0.0.0 and 192.0.2.2:52365, the
    # runtime-env agent on the node IP, the dashboard/autoscaler Prometheus ports 44227/44217 on 0.0.0.0
    open_ = [s for s in socks if not _is_loopback(s[0]) and s[3] not in ALLOWED_NON_LOOPBACK]
    assert not open_, f"Ray ports open to other hosts: {open_}"

    # the same from the outside: a connection to the machine's external address is refused on every
    # one of those ports (catches a bind that psutil reports oddly, e.g. a second socket on the port)
    for ip in _external_ipv4()[:2]:
        for _, port, _, name in socks:
            if name in ALLOWED_NON_LOOPBACK:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                assert s.connect_ex((ip, port)) != 0, f"{name} answers on {ip}:{port}"


def test_prometheus_endpoint_is_loopback_only(cluster):
    url = prometheus_url()
    # the metrics export (no token needed to read it) is on 127.0.0.1: catches it on the node's
    # routable address, where any host could scrape the run's metrics and session labels
    assert url and url.startswith("http://127.0.0.1:"), url
    # and it is the live endpoint: catches a URL that names a port nobody listens on
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.status == 200
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def test_the_job_is_named_after_the_run(cluster):
    # the dashboard's Jobs table showed an empty "Name": the driver's job carries the run's name
    from marval_rl.rl.ray_executor import auth_headers

    req = urllib.request.Request(f"http://{cluster['url']}/api/jobs/", headers=auth_headers())
    with urllib.request.urlopen(req, timeout=30) as r:
        jobs = json.loads(r.read())
    assert any((j.get("metadata") or {}).get("job_name") == "marval-rl train: net" for j in jobs), jobs


def test_token_file_is_owner_only(cluster):
    if not token_auth_enabled():
        pytest.skip("token auth is off (RAY_AUTH_MODE=disabled)")
    path = auth_token_path()
    if os.environ.get("RAY_AUTH_TOKEN") and not path.is_file():
        pytest.skip("token from $RAY_AUTH_TOKEN, no file")
    st = path.stat()
    if st.st_uid != os.getuid():
        pytest.skip(f"{path} belongs to another user; not ours to chmod")
    # 0600: catches the token (full control of the cluster) world-readable, as Ray writes it (0644)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)


def test_new_token_is_created_owner_only(tmp_path, monkeypatch):
    """No Ray start: the token Ray would generate for a first local cluster is created 0600 from the
    first byte (Ray's own ``open(path, "w")`` leaves it 0644 until the chmod after start)."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    ray_executor._precreate_private_token()
    path = tmp_path / ".ray" / "auth_token"
    # catches a token created with the umask's 0644, or not created at all
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    tok = path.read_text()
    assert len(tok) == 64 and int(tok, 16) >= 0  # Ray's format (secrets.token_hex(32))
    # an existing token is never replaced: catches a run invalidating the token of a running cluster
    ray_executor._precreate_private_token()
    assert path.read_text() == tok
    # RAY_AUTH_MODE=disabled: no token file is made
    path.unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_executor._precreate_private_token()
    assert not path.exists()


def test_existing_token_file_is_tightened(tmp_path, monkeypatch):
    path = tmp_path / "tok"
    path.write_text("x" * 64)
    os.chmod(path, 0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    ray_executor._private_token_file()
    # catches a 0644 token file (e.g. from an older Ray or a `ray start`) left readable by others
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
