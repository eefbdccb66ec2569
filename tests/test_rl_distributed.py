"""Two trainer processes (torchrun, gloo on CPU): gradients averaged, weights identical across ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from test_rl import NAMES, REWARD_FILE, setup  # noqa: F401  (module fixture)


def torchrun_train(tmp_path, recipe: dict) -> subprocess.CompletedProcess:
    """`marval-rl train` as 2 torchrun processes on CPU (gloo)."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MARVAL_DIST_BACKEND": "gloo"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "marval_rl.cli", "train", str(tmp_path / "r.yaml")],
                          capture_output=True, text=True, env=env, timeout=600)


def test_two_process_gloo_training(setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    recipe = {
        "model": {"checkpoint": str(setup / "student")}, "vae": {"checkpoint": str(setup / "vae")},
        "output_dir": str(out),
        "train": {"rewards": [{"name": f"{REWARD_FILE}:Brightness"}], "iterations": 2, "num_workers": 1,
                  "rollouts_per_worker": 2, "num_iter": 3, "classes": list(range(10)),
                  "class_names": NAMES.strip("[]").split(","), "grid_every": 0, "optim": {"lr": 1e-3},
                  "use_ray": False},
    }
    proc = torchrun_train(tmp_path, recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(x["world_size"] == 2 for x in lines)
    # the per-update fingerprint check (trainer ranks diverged -> error) passed on every step
    assert (out / "policy" / "model.safetensors").is_file()


def test_torchrun_ranks_share_one_ray_cluster(setup, tmp_path):  # noqa: F811
    """Under torchrun every rank runs the controller: rank 0 starts the one local Ray cluster (sized for
    every rank's workers) and the other ranks join it, instead of one private cluster per rank."""
    out = tmp_path / "run"
    recipe = {
        "model": {"checkpoint": str(setup / "student")}, "vae": {"checkpoint": str(setup / "vae")},
        "output_dir": str(out),
        "train": {"rewards": [{"name": f"{REWARD_FILE}:Brightness"}], "iterations": 2, "num_workers": 1,
                  "rollouts_per_worker": 2, "num_iter": 3, "classes": list(range(10)), "eval_per_class": 0,
                  "class_names": NAMES.strip("[]").split(","), "grid_every": 0, "optim": {"lr": 1e-3}},
    }
    proc = torchrun_train(tmp_path, recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "torchrun rank 1 joined rank 0's cluster at 127.0.0.1:" in text, text[-3000:]
    assert text.count("[ray] torchrun rank") == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(x["world_size"] == 2 for x in lines)
