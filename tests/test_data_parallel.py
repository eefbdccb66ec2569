"""Data-parallel distillation and pretraining under torchrun (gloo on CPU), through the real command.

The rule under test (marval_rl/distributed.py): N ranks at per-rank batch B/N compute what one process
computes at batch B. Two runs of the same recipe, one process at global batch 8 and two ranks at 4 each,
must agree within a float32 bound:

* every logged metric (losses, the pre-clip gradient norm) to ``METRIC_RTOL``. The runs differ only in
  how the batch's sums are split (two partial means averaged instead of one mean) and in the matmul
  blocking of a smaller batch: each reduction of n float32 terms is off by at most ~n u relative
  (u = 2^-24); the largest here runs over the masked token rows of the batch times the 16 channels
  (8 x 64 x 16 = 8192 terms), n u = 4.9e-4, so 1e-3;
* the trained weights, as the size of their difference relative to how far training moved them
  (``WEIGHT_RTOL``). Adam divides each gradient coordinate by its own running scale, so a relative
  gradient error delta becomes a relative step error of about delta (the same 4.9e-4 bound), except on
  coordinates whose gradient is itself at rounding level, whose share of the update norm is negligible.

A bug of the kinds data parallelism invites moves these by O(1) instead: gradients summed instead of
averaged (the logged gradient norm doubles), a rank that sees another rank's shard or the whole batch
(the losses and weights differ), the sharding of the random draws misaligned with the data rows.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from marval_rl.models.checkpoints import load_pretrained

METRIC_RTOL = 1e-3
WEIGHT_RTOL = 1e-3
ROOT = Path(__file__).resolve().parents[1]
STEPS = 12

DISTILL = ["recipes/distill_embedded.yaml", "data.per_class=4", f"distill.generator_optim.steps={STEPS}",
           f"distill.fake_optim.steps={STEPS}", "distill.generator_optim.batch_size=8",
           "distill.checkpoint_every=2", "distill.sample_every=0", "distill.log_every=1",
           "distill.generator_optim.warmup_steps=2", "distill.fake_optim.warmup_steps=2"]
PRETRAIN = ["recipes/pretrain_embedded.yaml", "data.per_class=2", "pretrain.log_every=1",
            "pretrain.sample_every=0", "pretrain.checkpoint_every=2",
            "pretrain.vae.optim.steps=3", "pretrain.vae.optim.batch_size=8", "pretrain.vae.optim.warmup_steps=1",
            "pretrain.vae.auto_latent_scale=false",
            "pretrain.mar.optim.steps=4", "pretrain.mar.optim.batch_size=8", "pretrain.mar.optim.warmup_steps=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MARVAL_DIST_BACKEND": "gloo", "PYTHONUNBUFFERED": "1"}


def command(ranks: int, args: list[str]) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    return launch + ["-m", "marval_rl.cli", *args]


def run(ranks: int, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(ranks, args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_same_metrics(one: Path, two: Path, keys: tuple[str, ...]):
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) > 1
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=METRIC_RTOL, abs=1e-7), (ra["step"], k, ra[k], rb[k])


def relative_difference(a: dict, b: dict, start: dict) -> float:
    """|a - b| / |a - start| over all tensors: the disagreement relative to how far training moved."""
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    den = sum(float((a[k].double() - start[k].double()).square().sum()) for k in a)
    assert den > 0, "training did not move the weights"
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def distill_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_distill")
    run(1, ["distill", *DISTILL, f"output_dir={root / 'one'}"])
    run(2, ["distill", *DISTILL, f"output_dir={root / 'two'}"])
    return root


def test_two_ranks_distill_like_one_process_at_the_global_batch(distill_runs):
    # gradients summed instead of averaged (grad_norm x2), a rank drawing the whole batch or another rank's
    # rows, or noise sharded out of step with the data rows all fail here
    one, two = distill_runs / "one", distill_runs / "two"
    assert_same_metrics(one / "distill_metrics.jsonl", two / "distill_metrics.jsonl",
                        ("gsim_loss", "fake_loss", "grad_norm", "score_gap"))
    sa = torch.load(one / "distill_train_state.pt", weights_only=True)
    sb = torch.load(two / "distill_train_state.pt", weights_only=True)
    teacher = load_pretrained(ROOT / "marval_rl/assets/embedded/teacher")
    from marval_rl.models.one_step import MARVAL

    start = {"fake": teacher.diffloss.net.state_dict(),
             "generator": MARVAL.from_teacher(teacher, 950).one_step.state_dict()}
    for name in ("fake", "generator"):
        a, b = sa["trainables"][name]["model"], sb["trainables"][name]["model"]
        assert relative_difference(a, b, start[name]) < WEIGHT_RTOL, name
    # the shipped EMA student: an EMA updated per rank from un-synchronised weights would show here
    ea, eb = sa["trainables"]["generator"]["ema"], sb["trainables"]["generator"]["ema"]
    assert relative_difference(ea, eb, start["generator"]) < WEIGHT_RTOL
    # rank 0 alone writes: one log row per step, one state, one student, the run record once
    assert len(metrics(two / "distill_metrics.jsonl")) == STEPS
    assert (two / "student" / "model.safetensors").is_file() and (two / "run.json").is_file()
    assert len(sb["torch_rng_ranks"]) == 2          # each rank's own dropout stream, for an exact resume


def test_killed_rank_stops_the_run_in_one_line_and_a_rerun_resumes_exactly(distill_runs, tmp_path):
    # resume that reloads only rank 0's RNG / optimiser / generator, or a state written mid-way (not
    # atomically) when a rank dies, gives weights that differ from the uninterrupted run
    out = tmp_path / "killed"
    args = ["distill", *DISTILL, f"output_dir={out}"]
    proc = subprocess.Popen(command(2, args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    rank1 = rank_pid(proc.pid, 1)          # found while the ranks start, so the kill follows the state at once
    state, deadline = out / "distill_train_state.pt", time.time() + 300
    while not state.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert rank1 is not None and proc.poll() is None, "the run ended before a rank could be killed"
    os.kill(rank1, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    saved = torch.load(state, weights_only=True)["step"]
    assert saved < STEPS, "the killed run finished anyway; nothing was tested"
    ours = [x for x in err.splitlines() if x.startswith("error: rank 0")]
    assert len(ours) == 1 and "run the same command again to resume" in ours[0], err[-3000:]
    assert "Traceback" not in "\n".join(x for x in err.splitlines() if "rank 0" in x)

    resumed = run(2, args)
    assert f"resuming from step {saved}" in resumed.stdout + resumed.stderr
    a = torch.load(distill_runs / "two" / "distill_train_state.pt", weights_only=True)
    b = torch.load(state, weights_only=True)
    for name in ("fake", "generator"):
        for part in ("model", "ema"):
            for k, v in a["trainables"][name][part].items():
                assert torch.equal(v, b["trainables"][name][part][k]), (name, part, k)
    assert metrics(out / "distill_metrics.jsonl") == [
        {**r, "seconds": s["seconds"]} for r, s in zip(metrics(distill_runs / "two" / "distill_metrics.jsonl"),
                                                        metrics(out / "distill_metrics.jsonl"))]


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with RANK=rank (a descendant of the launcher)."""
    def parent(pid: int) -> int:
        try:
            return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    for _ in range(500):
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() not in env:
                continue
            pid = int(d.name)
            while pid > 1 and pid != launcher:
                pid = parent(pid)
            if pid == launcher:
                return int(d.name)
        time.sleep(0.02)
    return None


def test_two_ranks_pretrain_vae_and_mar_like_one_process(tmp_path):
    # the VAE's posterior noise and MAR's orders / mask ratio / label drop / head timesteps and noise must
    # be drawn for the global batch and cut to each rank's rows in MAR.forward's own order
    run(1, ["pretrain", *PRETRAIN, f"output_dir={tmp_path / 'one'}"])
    run(2, ["pretrain", *PRETRAIN, f"output_dir={tmp_path / 'two'}"])
    for stage, keys in (("vae", ("loss", "grad_norm", "kl", "mse")), ("mar", ("loss", "grad_norm"))):
        assert_same_metrics(tmp_path / "one" / f"{stage}_metrics.jsonl", tmp_path / "two" / f"{stage}_metrics.jsonl",
                            keys)
    for stage in ("vae", "mar"):
        a = torch.load(tmp_path / "one" / f"{stage}_train_state.pt", weights_only=True)["trainables"][stage]
        b = torch.load(tmp_path / "two" / f"{stage}_train_state.pt", weights_only=True)["trainables"][stage]
        assert relative_difference(a["model"], b["model"], initial_weights(stage)) < WEIGHT_RTOL, stage
    assert (tmp_path / "two" / "teacher" / "model.safetensors").is_file()


def initial_weights(stage: str) -> dict:
    """The weights a pretrain stage starts from: the recipe's seed (0) before the model is built."""
    from marval_rl.config import load_recipe
    from marval_rl.models.mar import MAR, MARConfig
    from marval_rl.models.vae import AutoencoderKL, VAEConfig

    recipe = load_recipe(str(ROOT / PRETRAIN[0]), [])
    torch.manual_seed(recipe.pretrain.seed)
    if stage == "vae":
        return AutoencoderKL(VAEConfig.from_dict(dict(recipe.pretrain.vae.config))).state_dict()
    vae = load_pretrained(ROOT / "marval_rl/assets/embedded/vae")
    return MAR(MARConfig.from_dict({"vae_embed_dim": vae.config.embed_dim, **dict(recipe.pretrain.mar.config)})
               ).state_dict()


def test_a_world_size_that_does_not_divide_the_global_batch_is_one_line(monkeypatch, capsys, tmp_path):
    # without the check, 3 ranks at batch 8 would silently train on 2 + 2 + 2 (local_rows floors) or crash
    from marval_rl import cli, distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    code = cli.main(["distill", *DISTILL, "distill.generator_optim.batch_size=8", f"output_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "distill.generator_optim.batch_size=8 is not divisible by the world size 3" in err[0]
    assert not (tmp_path / "x").exists()


def test_accelerate_launch_runs_the_same_ranks(distill_runs, tmp_path):
    # `accelerate launch` sets the same environment as torchrun; a seam that read only torchrun's variables
    # (or initialised a second process group) would train as two independent processes and fail this
    pytest.importorskip("accelerate")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]
    proc = subprocess.run(launch + ["-m", "marval_rl.cli", "distill", *DISTILL, f"output_dir={tmp_path / 'acc'}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["world_size"] == 2
    assert_same_metrics(distill_runs / "two" / "distill_metrics.jsonl", tmp_path / "acc" / "distill_metrics.jsonl",
                        ("gsim_loss", "fake_loss", "grad_norm", "score_gap"))
