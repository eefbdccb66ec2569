"""RayExecutor on a real local Ray cluster (CPU, offline): equality with in-process rollouts, weight
sync checks, a killed worker replaced, the whole controller on Ray, the token-protected dashboard.

One Ray cluster (2 CPUs) serves the whole module: starting Ray costs 5-15 s on a loaded box."""
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import ray  # noqa: E402  (a core dependency)

from marval_rl.config import ModelSection, RewardSpec, TrainSection, VAESection, load_recipe  # noqa: E402
from marval_rl.rl.batch import PolicyWeights, RolloutRequest  # noqa: E402
from marval_rl.rl.ray_executor import (RayExecutor, auth_headers, auth_token, init_ray,  # noqa: E402
                                       prometheus_url, token_auth_enabled)
from marval_rl.rl.rollout import RolloutWorker, StaleWeightsError, WorkerSpec  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
REWARD_FILE = (FIXTURES / "user_rewards" / "brightness.py").resolve()
NAMES = ["tench", "goldfish", "shark", "tiger shark", "hammerhead", "ray", "cock", "hen", "ostrich", "brambling"]


@pytest.fixture(scope="module")
def policy_dirs(tmp_path_factory):
    from conftest import make_tiny_policy_dirs

    return make_tiny_policy_dirs(tmp_path_factory.mktemp("ray_policy"))


@pytest.fixture(scope="module")
def spec(policy_dirs):
    return WorkerSpec(model=ModelSection(checkpoint=str(policy_dirs / "student")),
                      vae=VAESection(checkpoint=str(policy_dirs / "vae")),
                      rewards=[RewardSpec(name=f"{REWARD_FILE}:Brightness")],
                      num_iter=3, class_names=NAMES, threads=1)


@pytest.fixture(scope="module")
def cluster():
    """A local cluster started by the executor's own init path, sized for the 2-core box."""
    if ray.is_initialized():  # another test module left Ray running: start from a clean slate
        ray.shutdown()
    started, url = init_ray(TrainSection(num_workers=2, worker_threads=1), num_cpus=2)
    assert started and url
    yield url
    ray.shutdown()


@pytest.fixture(scope="module")
def weights(spec):
    """Version 1: the student's head with a small perturbation (so the sync matters)."""
    from marval_rl.loading import load_generator

    policy = load_generator(spec.model, "cpu", expected="marval")
    g = torch.Generator().manual_seed(1)
    state = {f"one_step.{k}": v + 1e-2 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in policy.one_step.state_dict().items()}
    return PolicyWeights.of(1, state)


REQUESTS = [RolloutRequest(version=1, class_ids=[0, 1, 2], seed=123),
            RolloutRequest(version=1, class_ids=[3, 4], seed=7),
            RolloutRequest(version=1, class_ids=[5, 9], seed=99)]   # 3 requests on 2 workers: round robin


def _get(url, headers=None, method="GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


@pytest.fixture(scope="class")
def executor(cluster, spec):
    """Two actors shared by the tests of one class (gone before the controller test needs the CPUs)."""
    ex = RayExecutor(spec, 2, TrainSection(num_workers=2, worker_threads=1))
    yield ex
    ex.shutdown()
    assert ray.is_initialized(), "an executor that reused Ray must not shut it down"


class TestRayWorkers:

    def test_rollouts_equal_in_process_worker(self, executor, spec, weights):
        executor.set_weights(weights)
        batches = executor.rollout(REQUESTS)
        local = RolloutWorker(spec, 0)
        local.set_weights(weights)
        assert [b.worker_id for b in batches] == [0, 1, 0]
        for req, b in zip(REQUESTS, batches):
            ref = local.rollout(req)
            assert b.version == 1
            assert b.class_ids.tolist() == req.class_ids
            assert torch.equal(b.tokens, ref.tokens), "Ray rollout differs from the in-process rollout"
            assert torch.equal(b.images, ref.images)
            assert torch.equal(b.rewards.total, ref.rewards.total)
        # the weights really travelled: version-1 tokens differ from the checkpoint's own (version 0)
        local0 = RolloutWorker(spec, 0)
        local0.set_weights(PolicyWeights.of(0, {k: v for k, v in local0.policy.state_dict().items()
                                                if k.startswith("one_step.")}))
        assert not torch.equal(local0.rollout(RolloutRequest(0, [0, 1, 2], 123)).tokens, batches[0].tokens)

    def test_stale_request_and_bad_checksum_refused(self, executor, weights):
        executor.set_weights(weights)
        with pytest.raises(StaleWeightsError, match="holds policy version 1, request is for version 2"):
            executor.rollout([RolloutRequest(version=2, class_ids=[0], seed=0)])
        with pytest.raises(StaleWeightsError, match="checksum"):
            executor.set_weights(PolicyWeights(2, weights.state, "0" * 16))
        assert executor.replacements == 0, "an error inside a worker is not a dead worker"
        # the refused weights changed nothing: version 1 still serves
        assert executor.rollout(REQUESTS[1:2])[0].version == 1

    def test_killed_worker_is_replaced_and_its_work_redone(self, executor, weights, capsys):
        executor.set_weights(weights)
        before = executor.rollout(REQUESTS)
        pids = executor.pids()
        assert len(set(pids)) == 2 and os.getpid() not in pids
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.time() + 20
        while time.time() < deadline:  # wait until the process is really gone (reaped by the raylet)
            try:
                os.kill(pids[1], 0)
                time.sleep(0.1)
            except ProcessLookupError:
                break
        after = executor.rollout(REQUESTS)
        assert len(after) == len(REQUESTS)
        assert [b.version for b in after] == [1, 1, 1], "the replacement must hold the current weights"
        for a, b in zip(before, after):
            assert torch.equal(a.tokens, b.tokens), "redone work must equal the original"
        assert executor.replacements == 1
        assert executor.names == ["marval-rl-worker-0", "marval-rl-worker-1-r1"]
        new = executor.pids()
        assert new[0] == pids[0] and new[1] != pids[1]
        assert "rollout worker 1 (marval-rl-worker-1) died" in capsys.readouterr().out
        # the next iteration's weights reach the replacement too
        executor.set_weights(PolicyWeights.of(2, weights.state))
        assert [b.version for b in executor.rollout([RolloutRequest(2, [0], 1)] * 2)] == [2, 2]

    def test_dashboard_token_auth_and_named_actors(self, executor, cluster):
        base = f"http://{cluster}"
        assert cluster.startswith("127.0.0.1:"), "the dashboard must stay on loopback by default"
        status, body, _ = _get(f"{base}/api/version", auth_headers())
        assert status == 200, body
        assert json.loads(body)["ray_version"] == ray.__version__
        if token_auth_enabled():
            token = auth_token()
            assert token, "token auth is on, so the token file must exist"
            assert _get(f"{base}/api/version")[0] == 401
            assert _get(f"{base}/api/version", {"Authorization": "Bearer wrong"})[0] == 403
            # the browser's login: POST the token once, then the cookie alone is enough
            status, _, headers = _get(f"{base}/api/authenticate", {"Authorization": f"Bearer {token}"}, "POST")
            assert status == 200
            cookie = headers["Set-Cookie"].split(";")[0]
            assert cookie.startswith("ray-authentication-token=")
            assert _get(f"{base}/api/version", {"Cookie": cookie})[0] == 200
        status, body, _ = _get(f"{base}/api/v0/actors?limit=100&detail=1", auth_headers())
        assert status == 200
        actors = json.loads(body)["data"]["result"]["result"]
        names = {a.get("name") for a in actors}
        assert "marval-rl-worker-0" in names
        # the Actors table's "Repr" column says which worker and which policy version (empty before)
        reprs = {a.get("name"): a.get("repr_name", "") for a in actors}
        assert reprs["marval-rl-worker-0"].startswith("RolloutWorker(id=0, policy_version="), reprs


def test_run_training_on_ray(cluster, policy_dirs, tmp_path, capsys):
    from marval_rl.rl.controller import run_training

    out = tmp_path / "run"
    recipe = load_recipe(None, [
        f"model.checkpoint={policy_dirs / 'student'}", f"vae.checkpoint={policy_dirs / 'vae'}", f"output_dir={out}",
        f"train.rewards=[{{name: {REWARD_FILE}:Brightness}}]", f"train.gold=[{{name: {REWARD_FILE}:Argmax}}]",
        "train.iterations=2", "train.num_workers=2",
        "train.rollouts_per_worker=2", "train.num_iter=3", "train.worker_threads=1", "train.grid_every=0",
        "train.classes=[0,1,2,3,4,5,6,7,8,9]", f"train.class_names=[{','.join(NAMES)}]", "train.optim.lr=1e-3"])
    summary = run_training(recipe, use_ray=True, progress=False)
    assert summary["iterations"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(lines) == 2
    assert [m["version"] for m in lines] == [1, 2]
    assert all(m["rollouts_per_s"] > 0 for m in lines)
    assert "[ray] dashboard: http://127.0.0.1:" in capsys.readouterr().out
    assert ray.is_initialized()
    # the controller's report() reached the custom gauges: Ray's metrics agent exports them
    # (Prometheus text format, "ray_" prefix) after its ~10 s report interval
    url, seen, deadline = prometheus_url(), {}, time.time() + 60
    # wait for the export of the *last* report (an earlier export may still show version 1)
    while time.time() < deadline and seen.get("ray_marval_rl_policy_version") != 2.0:
        _, body, _ = _get(url)
        seen = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                if line.startswith("ray_marval_rl_")}
        time.sleep(1)
    assert seen.get("ray_marval_rl_policy_version") == 2.0, seen
    assert seen.get("ray_marval_rl_rollouts_per_s", 0) > 0
    assert abs(seen["ray_marval_rl_reward_mean"] - lines[-1]["reward/total"]) < 1e-6
    assert "ray_marval_rl_version_lag" in seen
    # the run wrote a Prometheus scrape config for exactly this endpoint (graphs offline, docs/ray.md)
    assert f"targets: ['{url.split('/')[2]}']" in (out / "prometheus.yml").read_text()
    # gold rewards are exported too, one series per gold reward (a dropped gold gauge fails this)
    gold = [line for line in body.decode().splitlines() if line.startswith("ray_marval_rl_gold_reward_mean{")]
    assert any('reward="argmax_red"' in line for line in gold), gold
    assert abs(float(gold[0].rsplit(" ", 1)[1]) - lines[-1]["gold/argmax_red"]) < 1e-6
