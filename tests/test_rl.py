"""RL in one process (--no-ray): replay == rollout, PPO ratio == 1 on-policy, reward goes up, exact
resume, and bad input."""
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_policy_dirs
from marval_rl.config import load_recipe
from marval_rl.rl.controller import run_training
from marval_rl.rl.update_rules import group_advantages

REWARD_FILE = Path(__file__).parent / "fixtures" / "user_rewards" / "brightness.py"
NAMES = "[tench,goldfish,great white shark,tiger shark,hammerhead,electric ray,stingray,cock,hen,ostrich]"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_tiny_policy_dirs(tmp_path_factory.mktemp("rl"))


def recipe(setup, out, *extra, reward="Brightness"):
    return load_recipe(None, [
        f"model.checkpoint={setup / 'student'}", f"vae.checkpoint={setup / 'vae'}", f"output_dir={out}",
        f"train.rewards=[{{name: '{REWARD_FILE}:{reward}'}}]", f"train.gold=[{{name: '{REWARD_FILE}:Argmax'}}]",
        "train.iterations=3", "train.rollouts_per_worker=4", "train.group_size=2", "train.num_iter=4",
        "train.classes=[0,1,2,3,4,5,6,7,8,9]", f"train.class_names={NAMES}", "train.grid_every=0",
        "train.optim.lr=3e-3", "train.checkpoint_every=1", *extra])


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_reward_gradient_replays_exactly_and_raises_reward(setup, tmp_path, capsys):
    summary = run_training(recipe(setup, tmp_path, "train.iterations=4", "train.optim.lr=1e-3"), use_ray=False,
                           progress=False)
    m = metrics(tmp_path)
    assert all(x["replay_max_abs_diff"] == 0.0 for x in m)          # the trainer's replay IS the rollout
    assert summary["optimised_last"] > summary["optimised_first"] + 0.01
    assert set(summary["gold_last"]) == {"gold/argmax_red"}            # logged, never optimised
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["iterations"] == 4 and "| reward/total |" in "\n".join(out)
    assert (tmp_path / "reward_curve.png").is_file() and (tmp_path / "policy" / "config.json").is_file()
    # the fixed eval set: gain in units of the starting spread (catches a gain divided by the wrong std)
    k = "reward/total"
    gain = (summary["eval_last"][k] - summary["eval_first"][k]) / summary["eval_std_first"][k]
    assert summary["eval_gain_sigma"][k] == pytest.approx(gain) and gain > 0
    assert summary["eval_real"] == {} and summary["fid_proxy_first"] is None   # no real ceiling for these classes
    assert (tmp_path / "before_after.png").is_file()


def test_policy_gradient_ratio_is_one_on_policy(setup, tmp_path):
    run_training(recipe(setup, tmp_path, "train.algorithm=policy_gradient", "train.iterations=2",
                        "train.explore_std=0.1", "train.optim.lr=1e-5", "train.kl_weight=0.1"),
                 use_ray=False, progress=False)
    m = metrics(tmp_path)
    # catches: worker and trainer log-probs computed differently (the ratio would not be exactly 1)
    assert all(x["pg/ratio_first_epoch_max_dev"] == 0.0 for x in m)
    # catches: a KL against the policy itself (always 0) or against a moving reference: it is exactly 0
    # before the first update (policy == reference) and positive after it
    assert m[0]["pg/kl"] == 0.0 and m[1]["pg/kl"] > 0


def test_group_advantages():
    a = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_killed_run_resumes_exactly(setup, tmp_path):
    straight, split = tmp_path / "a", tmp_path / "b"
    run_training(recipe(setup, straight), use_ray=False, progress=False)
    run_training(recipe(setup, split), use_ray=False, progress=False, stop_after=1)
    run_training(recipe(setup, split), use_ray=False, progress=False)
    ma, mb = metrics(straight), metrics(split)
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "rollouts_per_s"))}  # noqa: E731
    assert [drop(x) for x in ma] == [drop(x) for x in mb]


def test_bad_input(setup, tmp_path):
    with pytest.raises(ValueError, match="needs differentiable rewards.*argmax_red"):
        run_training(recipe(setup, tmp_path, reward="Argmax"), use_ray=False, progress=False)
    with pytest.raises(ValueError, match="broken.*NaN"):
        run_training(recipe(setup, tmp_path, reward="Broken"), use_ray=False, progress=False)
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'"):
        run_training(load_recipe(None, [f"model.checkpoint={setup / 'student'}", f"vae.checkpoint={setup / 'vae'}",
                                        "train.rewards=[{name: no_such_reward}]"]), use_ray=False)
    with pytest.raises(ValueError, match="exceeds the .* CPU cores"):
        run_training(recipe(setup, tmp_path, "train.num_workers=64"), use_ray=False)
    from marval_rl.models.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="'mar' checkpoint, but a 'marval' is expected"):
        run_training(recipe(setup, tmp_path, f"model.checkpoint={setup / 'teacher'}"), use_ray=False)
    # an RL state from another run's architecture is refused, naming the mismatch
    other = tmp_path / "other"
    run_training(recipe(setup, other, "train.iterations=1"), use_ray=False, progress=False)
    state = torch.load(other / "rl_state.pt", weights_only=True)
    state["trainer"]["trainable"] = {k: v[..., :1] for k, v in state["trainer"]["trainable"].items()}
    torch.save(state, other / "rl_state.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        run_training(recipe(setup, other, "train.iterations=2"), use_ray=False, progress=False)
