"""What a run writes is sound: no NaN weights saved, every JSON strictly valid, no environment read by a
recipe. Each test fails on the code before its fix (named in its comment)."""
import json
from pathlib import Path

import pytest

from marval_rl import strict_json
from marval_rl.cli import main
from test_rl import recipe, setup  # noqa: F401  (module fixture)

RULES = Path(__file__).parent / "fixtures" / "user_rules" / "nan_rule.py"


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as jq, JSON.parse and every non-Python parser do."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_strict_dumps_writes_null_for_non_finite_numbers():
    # json.dumps writes NaN / Infinity, which strict parsers reject (the probe's summary.json held Infinity)
    text = strict_json.dumps({"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": (2, "x")})
    assert strict_loads(text) == {"a": None, "b": [1.5, None, None], "c": [2, "x"]}
    with pytest.raises(TypeError):                      # anything else that is not JSON still raises
        strict_json.dumps({"d": object()})


@pytest.mark.parametrize("rule", ["NaNLoss", "NaNWeights"])
def test_a_nan_update_stops_the_run_before_anything_is_saved(setup, tmp_path, capsys, rule):  # noqa: F811
    # before: with one iteration the run exited 0 and saved policy/ with NaN tensors; with two it blamed the
    # reward ("images contain NaN/Inf")
    from marval_rl.config import recipe_to_yaml

    r = recipe(setup, tmp_path / "run", f"train.algorithm='{RULES}:{rule}'", "train.iterations=1",
               "train.eval_per_class=0")
    (tmp_path / "r.yaml").write_text(recipe_to_yaml(r))
    code = main(["train", str(tmp_path / "r.yaml"), "--no-ray"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and err[-1].startswith("error: train.algorithm=") and \
        ("non-finite" in err[-1] or "loss is nan" in err[-1]), err[-3:]
    assert not (tmp_path / "run" / "policy").exists() and not (tmp_path / "run" / "rl_state.pt").exists()


def test_every_line_and_file_a_run_writes_is_strict_json(setup, tmp_path, capsys):  # noqa: F811
    # before: a rule's NaN metric wrote `NaN` into metrics.jsonl, and the last stdout line and
    # summary.json could hold NaN / Infinity
    from marval_rl.rl.controller import run_training

    run_training(recipe(setup, tmp_path, f"train.algorithm='{RULES}:NaNMetric'", "train.iterations=2"),
                 use_ray=False, progress=False)
    rows = [strict_loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["my/nan"] is None and r["my/inf"] is None for r in rows)
    strict_loads((tmp_path / "summary.json").read_text())
    strict_loads((tmp_path / "run.json").read_text())
    strict_loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_recipe_may_not_read_the_environment(tmp_path, capsys, monkeypatch):
    # before: ${oc.env:VAR} resolved, so a recipe from elsewhere could copy a secret into recipe.yaml,
    # the logs and wandb
    monkeypatch.setenv("MARVAL_TEST_SECRET", "hunter2")
    (tmp_path / "r.yaml").write_text("output_dir: ${oc.env:MARVAL_TEST_SECRET}\n")
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "recipe key 'output_dir'" in err[0] and "environment variable" in err[0]
    assert main(["validate", "quickstart", "sample.seed=${oc.env:MARVAL_TEST_SECRET}"]) == 2   # overrides too
    monkeypatch.setenv("MARVAL_RL_RECIPE_ENV", "1")                                    # the opt-in
    from marval_rl.config import load_recipe

    assert load_recipe(str(tmp_path / "r.yaml")).output_dir == "hunter2"


def test_two_runs_into_one_folder_the_second_is_refused_in_one_line(tmp_path):
    # before: both `marval-rl` processes exited 0, the metrics interleaved, recipe.yaml was one run's and
    # the weights the other's. Two real processes, as a user with two shells would start them.
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "shared"
    args = [sys.executable, "-m", "marval_rl.cli", "distill", "recipes/distill_embedded.yaml", "data.per_class=2",
            "distill.generator_optim.steps=100000", "distill.fake_optim.steps=100000", "distill.log_every=1",
            "distill.sample_every=0", "distill.checkpoint_every=0", f"output_dir={out}"]
    first = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "distill_metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        second = subprocess.run(args + ["distill.seed=1"], cwd=root, capture_output=True, text=True, timeout=300)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1, second.stderr[-2000:]
        assert f"output_dir {out} is in use by another marval-rl run (pid {first.pid}" in err[0]
        assert first.poll() is None                                   # the first run goes on untouched
        assert "distill.seed=1" not in (out / "run.json").read_text()  # the record is the first run's
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # a killed run leaves no stale lock: the next run into the folder is not refused
    from marval_rl.run_record import output_lock

    with output_lock(out, "distill"):
        assert json.loads((out / ".marval-rl.lock").read_text())["pid"] == os.getpid()


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_training_state_is_refused(tmp_path):
    # before: torch.load does not check the zip's CRC32s, so one flipped bit in rl_state.pt resumed silently
    import torch

    from marval_rl.models.checkpoints import CheckpointError, torch_load_safely

    path = tmp_path / "state.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32), "step": 3}, path)
    raw = path.read_bytes()
    at = raw.index(torch.arange(4096, dtype=torch.float32)[1000:1001].numpy().tobytes())  # inside the tensor
    _flip_bit(path, at)
    assert torch.load(path, weights_only=True)["step"] == 3          # torch itself loads it without a word
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        torch_load_safely(path)


def test_a_flipped_bit_in_saved_weights_is_refused(tmp_path):
    # before: safetensors has no checksum, so one flipped bit in model.safetensors loaded silently
    from safetensors.torch import load_file

    from marval_rl.models.checkpoints import CheckpointError, load_pretrained, save_pretrained

    model = load_pretrained(Path(__file__).resolve().parents[1] / "marval_rl/assets/embedded/vae")
    save_pretrained(model, tmp_path / "vae")
    assert load_pretrained(tmp_path / "vae") is not None              # a sound file loads
    weights = tmp_path / "vae" / "model.safetensors"
    _flip_bit(weights, weights.stat().st_size - 5)                    # a byte of the last tensor's data
    load_file(str(weights))                                           # safetensors itself loads it
    with pytest.raises(CheckpointError, match="do not match the digest"):
        load_pretrained(tmp_path / "vae")


def test_ctrl_c_says_where_it_stopped_in_one_line(tmp_path):
    # before: Ctrl-C printed a 30-40 line KeyboardInterrupt traceback although the saved state was fine
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "marval_rl.cli", "distill", "recipes/distill_embedded.yaml",
                          "data.per_class=2", "distill.generator_optim.steps=100000", "distill.fake_optim.steps=100000",
                          "distill.log_every=1", "distill.sample_every=0", "distill.checkpoint_every=1",
                          f"output_dir={out}"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "distill_train_state.pt").is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C); the last saved state is intact")
    assert torch_state_step(out / "distill_train_state.pt") >= 1     # ... and it is: the folder was kept


def torch_state_step(path: Path) -> int:
    import torch

    return int(torch.load(path, weights_only=True)["step"])


@pytest.mark.parametrize("state", ["vae_train_state.pt", "classifier_train_state.pt", "clip_train_state.pt"])
def test_a_failed_run_keeps_a_folder_that_holds_a_saved_state(tmp_path, state):
    # the lock removes a folder it created only while no state was saved; a pretrain state it did not know
    # (classifier / clip stages) was deleted with the folder by an interrupted `pretrain` of those stages
    from marval_rl.run_record import output_lock

    out = tmp_path / "new" / "run"
    with pytest.raises(KeyboardInterrupt):
        with output_lock(out, "pretrain"):
            (out / state).write_bytes(b"state")
            raise KeyboardInterrupt
    assert (out / state).is_file()
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path / "other" / "run", "pretrain"):
            raise RuntimeError("failed before any state")
    assert not (tmp_path / "other").exists()          # nothing saved: the folders it made are gone
