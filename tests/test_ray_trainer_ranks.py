"""Trainer ranks as Ray actors (train.trainer_ranks, rl/ray_trainers.py): 2 CPU trainer ranks (gloo) + 2
rollout workers in one Ray cluster equal a 1-rank run at the same global batch, only the controller
writes, a stopped run resumes exactly, and too many ranks for the machine is a one-line error.

One Ray cluster (4 logical CPUs: 2 trainer ranks + 2 rollout workers, on the 2-core box; the loop
alternates rollouts and updates, so they do not compete) serves the module."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ray

from marval_rl.config import TrainSection, load_recipe
from marval_rl.rl.controller import run_training
from marval_rl.rl.ray_cluster import init_ray
from test_exact_resume import numbers, rows, weights
from test_rl import NAMES, REWARD_FILE, setup  # noqa: F401  (module fixture)

ITERS = 4


def recipe(setup, out, *extra):  # noqa: F811
    return load_recipe(None, [
        f"model.checkpoint={setup / 'student'}", f"vae.checkpoint={setup / 'vae'}", f"output_dir={out}",
        f"train.rewards=[{{name: '{REWARD_FILE}:Brightness'}}]", f"train.gold=[{{name: '{REWARD_FILE}:Argmax'}}]",
        f"train.iterations={ITERS}", "train.num_workers=2", "train.rollouts_per_worker=4", "train.num_iter=4",
        "train.classes=[0,1,2,3,4,5,6,7,8,9]", f"train.class_names={NAMES}", "train.grid_every=2",
        "train.optim.lr=3e-3", "train.checkpoint_every=1", "train.eval_per_class=1", *extra])


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    started, _ = init_ray(TrainSection(), num_cpus=4)
    assert started
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(setup, cluster, tmp_path_factory):  # noqa: F811
    """A 1-rank reference (trainer in the controller, rollouts in-process), an uninterrupted 2-rank run,
    and a 2-rank run stopped after iteration 2 and resumed by a second run_training."""
    root = tmp_path_factory.mktemp("ranks")
    torch.set_num_threads(1)
    one = run_training(recipe(setup, root / "one"), use_ray=False, progress=False)
    two = run_training(recipe(setup, root / "two", "train.trainer_ranks=2"), use_ray=True, progress=False)
    part = recipe(setup, root / "resumed", "train.trainer_ranks=2")
    run_training(part, use_ray=True, progress=False, stop_after=2)
    resumed = run_training(recipe(setup, root / "resumed", "train.trainer_ranks=2"), use_ray=True, progress=False)
    return {"one": (root / "one", one), "two": (root / "two", two), "resumed": (root / "resumed", resumed)}


def test_two_ranks_equal_one_rank_at_the_same_global_batch(runs):
    """Catches (each tried by breaking the code on purpose): a split that drops or repeats a rollout batch
    (the rewards and weights move differently), and ranks that never all-reduce (each steps on its own half
    of the gradient: check_in_sync stops the run, "trainer ranks diverged"); also a per-rank reward scale
    (the std of half a batch). Tolerance: the only difference allowed is float32 summation order
    ((g_0/n_0 + g_1/n_1) / 2 vs sum_b g_b / n); with the power-of-2 shares here it is exact (0 measured), in
    general ~1e-7 relative per step, which Adam turns into at most ~lr x 1e-4 over 4 steps."""
    (one, _), (two, _) = runs["one"], runs["two"]
    a, b = numbers(one), numbers(two)
    assert [r["iteration"] for r in b] == list(range(1, ITERS + 1)) and all(r["trainer_ranks"] == 2 for r in b)
    for ra, rb in zip(a, b):
        for k in ("reward/total", "rg/reward", "rg/anchor", "rg/reward_scale", "grad_norm", "gold/argmax"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["iteration"], k)
    wa, wb = weights(one), weights(two)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"[ranks] max |w_1rank - w_2ranks| = {worst:.3g}")
    assert worst <= 3e-3 * ITERS * 1e-3, worst   # lr x steps x 1e-3: far below one step's O(lr) move


def test_only_the_controller_writes(runs):
    (one, s1), (two, s2) = runs["one"], runs["two"]
    # the same run folder as the 1-rank run (plus the Ray run's scrape config); no rank wrote a file of its own
    assert files(two) == sorted(files(one) + ["prometheus.yml"])
    assert len(rows(two)) == ITERS     # every iteration logged once
    assert s2["policy"] == str(two / "policy") and (two / "rl_state.pt").is_file()
    state = torch.load(two / "rl_state.pt", weights_only=False)
    assert state["iteration"] == ITERS and state["trainer"]["version"] == ITERS


def test_stopped_and_resumed_equals_uninterrupted(runs):
    (two, _), (resumed, _) = runs["two"], runs["resumed"]
    assert numbers(resumed) == numbers(two)
    wa, wb = weights(two), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cluster_too_small_is_named():
    from marval_rl.config import Recipe
    from marval_rl.rl.ray_trainers import check_cluster

    r = Recipe()
    r.train.trainer_ranks, r.train.num_workers = 3, 3
    with pytest.raises(ValueError, match=r"trainer_ranks=3 x train.trainer_threads=1 = 3 CPUs exceeds the 2 CPUs"):
        check_cluster(r, {"CPU": 2})
    with pytest.raises(ValueError, match=r"need 6 CPUs; the Ray cluster has 4"):
        check_cluster(r, {"CPU": 4})
    r.device = "cuda"
    with pytest.raises(ValueError, match=r"trainer_ranks=3 exceeds the 2 GPUs"):
        check_cluster(r, {"CPU": 64, "GPU": 2})
    with pytest.raises(ValueError, match=r"leaves none for the 3 rollout workers"):
        check_cluster(r, {"CPU": 64, "GPU": 3})
    check_cluster(r, {"CPU": 64, "GPU": 4})


def test_more_ranks_than_cpus_is_a_one_line_error(setup, tmp_path):  # noqa: F811
    """Checked before Ray starts or anything loads: one line, exit 2, naming the numbers."""
    import yaml

    cores = os.cpu_count() or 1
    out = tmp_path / "run"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "model": {"checkpoint": str(setup / "student")}, "vae": {"checkpoint": str(setup / "vae")},
        "output_dir": str(out), "train": {"rewards": [{"name": f"{REWARD_FILE}:Brightness"}], "num_workers": 2,
                                          "num_iter": 4, "trainer_ranks": 2, "trainer_threads": cores}}))
    proc = subprocess.run([sys.executable, "-m", "marval_rl.cli", "train", str(tmp_path / "r.yaml")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"train.trainer_ranks=2 x train.trainer_threads={cores} = {2 * cores} exceeds the {cores} CPU cores" in err[0]
    assert not out.exists()
