"""The update rules against references: float64 finite differences of the reward-gradient loss (anchor
included), exact on-policy ratios, policy gradient that climbs (and a sign flip that does not), the
shared-noise groups, and the update-rule seam (registry, a user's rule from a path, bad input)."""
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_MAR, tiny_constructor
from marval_rl.cli import main
from marval_rl.config import RewardSpec, load_recipe
from marval_rl.models import AutoencoderKL, VAEConfig, load_official_mar, save_pretrained
from marval_rl.models.one_step import MARVAL
from marval_rl.rl.batch import RolloutBatch
from marval_rl.rl.controller import run_training
from marval_rl.rl.policy import GaussianPolicySampler
from marval_rl.rl.rewards import RewardSet
from marval_rl.rl.trainer import RLTrainer
from marval_rl.rl.update_rules import UPDATE_RULES, PolicyGradient
from marval_rl.sampling import sample_tokens

FIX = Path(__file__).parent / "fixtures"
REWARD_FILE = FIX / "user_rewards" / "brightness.py"
RULE_FILE = FIX / "user_rules" / "sign_flipped.py"
NAMES = "[tench,goldfish,great white shark,tiger shark,hammerhead,electric ray,stingray,cock,hen,ostrich]"


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("rlu")
    teacher = load_official_mar(TINY_MAR / "checkpoint.pth", tiny_constructor())
    save_pretrained(MARVAL.from_teacher(teacher), root / "student")
    torch.manual_seed(0)
    save_pretrained(AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 1, 1, 1), num_groups=8, attn_resolutions=(),
                                            resolution=64)), root / "vae")
    return root


def recipe(models, out, *extra):
    return load_recipe(None, [
        f"model.checkpoint={models / 'student'}", f"vae.checkpoint={models / 'vae'}", f"output_dir={out}",
        f"train.rewards=[{{name: '{REWARD_FILE}:Brightness'}}]", "train.iterations=3",
        "train.rollouts_per_worker=4", "train.group_size=2", "train.num_iter=4", "train.classes=[0,1,2,3]",
        f"train.class_names={NAMES}", "train.grid_every=0", "train.eval_per_class=0", "train.checkpoint_every=0",
        *extra])


# --------------------------------------------------------------------------- reward gradient vs float64 FD
def _float64_trainer(models, *extra):
    from marval_rl.loading import load_generator, load_vae

    r = recipe(models, "/nonexistent", *extra)
    policy = load_generator(r.model).double()
    vae = load_vae(r.vae).double()
    with torch.no_grad():  # keep decoded pixels inside (0, 1): the clamp's kinks would spoil finite differences
        vae.decoder.conv_out.weight.mul_(0.2)
        vae.decoder.conv_out.bias.zero_()
    trainer = RLTrainer(policy, vae, RewardSet(r.train.rewards), r.train)
    trainer.rewards.composite.double()
    return trainer


def _rollout(trainer, labels, seed=0) -> RolloutBatch:
    """A rollout of the trainer's own policy (what a worker returns), in the policy's dtype."""
    sampler = GaussianPolicySampler(trainer.policy.one_step, trainer.std)
    with torch.no_grad():
        res = sample_tokens(trainer.policy, labels=torch.tensor(labels), num_iter=trainer.s.num_iter,
                            generator=torch.Generator().manual_seed(seed), token_sampler=sampler)
        rec = trainer.rewards.score_all(trainer.decode(res.tokens), ["x"] * len(labels),
                                        {"class_ids": torch.tensor(labels)})
    return RolloutBatch(version=trainer.version, worker_id=0, class_ids=torch.tensor(labels), prompts=["x"] * len(labels),
                        tokens=res.tokens, images=torch.zeros(1), rewards=rec, record=res.record,
                        old_logprobs=None)


def _loss_fd_check(trainer, batch, h=1e-7):
    """Autograd directional derivative of the RG loss vs central finite differences, in float64."""
    from marval_rl.rl.policy import per_sample_mean

    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    captured = {}

    def capture():
        captured["g"] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return 0.0

    trainer.step = capture
    trainer.rule.update(trainer, [batch])
    analytic = sum((gr * d).sum() for gr, d in zip(captured["g"], direction)).item()

    def loss_at(sign):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * h * d)
            sampler = trainer.sampler(batch, with_reference=trainer.s.reg_weight > 0)
            res = trainer.replay(batch, sampler)
            total, _ = trainer.rewards.total(trainer.decode(res.tokens), batch.prompts, {"class_ids": batch.class_ids})
            value = -total.mean()
            if trainer.s.reg_weight > 0:
                value = value + trainer.s.reg_weight * per_sample_mean(sampler.reg_rows, batch.record.predicted).mean()
            for p, d in zip(params, direction):
                p.sub_(sign * h * d)
        return value.item()

    numeric = (loss_at(1) - loss_at(-1)) / (2 * h)
    return analytic, numeric


def _perturb(trainer, scale=0.05):
    """Move the policy away from the reference so the anchor and its gradient are not zero."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainer.policy.parameters():
            if p.requires_grad:
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("trainable,reg", [("[head]", 0.0), ("[head]", 3.0), ("[all]", 3.0)])
def test_reward_gradient_loss_matches_finite_differences(models, trainable, reg):
    # catches: the anchor's reference computed under no_grad (its gradient through the visited states
    # lost), a trained backbone regularised only against the reference head, a gradient silently
    # truncated to the last AR steps, a wrong sign. float64 central differences at h = 1e-7: truncation
    # ~h^2 |f'''| (measured 5e-7 at h = 1e-6, so ~5e-9 here) + rounding ~eps64 |f| / h ~ 1e-9: rel 1e-6 is >100x both.
    trainer = _float64_trainer(models, f"train.trainable={trainable}", f"train.reg_weight={reg}",
                               "train.normalize_reward=false")
    _perturb(trainer)
    batch = _rollout(trainer, [0, 1, 2, 3])
    analytic, numeric = _loss_fd_check(trainer, batch)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_reward_gradient_reaches_the_first_ar_step(models):
    # catches: backprop truncated to the last step(s) by default. The same loss with grad_last_k=1 is a
    # different (truncated) derivative, and must NOT match the finite differences of the full loss.
    trainer = _float64_trainer(models, "train.reg_weight=0", "train.normalize_reward=false", "train.grad_last_k=1")
    batch = _rollout(trainer, [0, 1, 2, 3])
    truncated, numeric = _loss_fd_check(trainer, batch)
    assert abs(truncated - numeric) > 1e-3 * abs(numeric)
    trainer.s.grad_last_k = None
    full, numeric = _loss_fd_check(trainer, batch)
    assert full == pytest.approx(numeric, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("trainable", ["[all]", "[class_embedding]"])
def test_anchor_is_zero_at_the_reference_and_positive_away(models, trainable):
    # catches: an anchor that compares the policy with itself (always 0) or with a stale reference, and
    # (class_embedding: the head never moves) one that compares only heads on the policy's own z, so a
    # drifting backbone or class embedding goes unregularised.
    trainer = _float64_trainer(models, f"train.trainable={trainable}", "train.reg_weight=1.0")
    from marval_rl.rl.policy import per_sample_mean

    batch = _rollout(trainer, [0, 1])
    sampler = trainer.sampler(batch, with_reference=True)
    with torch.no_grad():
        trainer.replay(batch, sampler)
    assert per_sample_mean(sampler.reg_rows, batch.record.predicted).abs().max().item() == 0.0
    _perturb(trainer)
    sampler = trainer.sampler(batch, with_reference=True)
    with torch.no_grad():
        trainer.replay(batch, sampler)
    assert per_sample_mean(sampler.reg_rows, batch.record.predicted).min().item() > 1e-8


# --------------------------------------------------------------------------------------- policy gradient
def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_policy_gradient_is_exactly_on_policy(models, tmp_path):
    # catches: worker and trainer computing log-probs differently (ratio != 1 before the first step)
    run_training(recipe(models, tmp_path, "train.algorithm=policy_gradient", "train.iterations=2",
                        "train.kl_weight=0.1"), use_ray=False, progress=False)
    for x in metrics(tmp_path):
        assert x["pg/ratio_first_epoch_max_dev"] == 0.0
        assert x["pg/clip_frac"] == 0.0 and x["pg/approx_kl"] == 0.0


def test_shared_noise_groups_differ_only_by_exploration(models):
    # catches: group members drawing their own head noise or mask order (their reward spread would then
    # not come from the exploration the log-probability credits)
    from marval_rl.config import ModelSection, VAESection
    from marval_rl.rl.batch import RolloutRequest
    from marval_rl.rl.rollout import RolloutWorker, WorkerSpec

    spec = WorkerSpec(model=ModelSection(checkpoint=str(models / "student")), vae=VAESection(checkpoint=str(models / "vae")),
                      rewards=[RewardSpec(name=f"{REWARD_FILE}:Brightness")], num_iter=4, explore_std=0.1,
                      class_names=NAMES.strip("[]").split(","))
    w = RolloutWorker(spec)
    w.version = 0
    b = w.rollout(RolloutRequest(0, [1, 1, 1, 2, 2, 2], seed=3, group_size=3, share_noise=True))
    o = b.record.orders
    assert torch.equal(o[0], o[1]) and torch.equal(o[1], o[2]) and not torch.equal(o[2], o[3])
    rows = int(b.record.predicted[0].sum())
    assert b.record.noise[0][0].shape[0] == rows // 3 and b.record.noise[0][1].shape[0] == rows  # head, xi
    assert not torch.equal(b.tokens[0], b.tokens[1])  # exploration differs
    det = w.rollout(RolloutRequest(0, [1, 1, 1, 2, 2, 2], seed=3, group_size=3, share_noise=True, explore=False))
    t = det.tokens
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2]) and not torch.equal(t[2], t[3])
    # the mean log-prob of each explored step is the per-dim mean of log N(xi * std; 0, std^2)
    xi = b.record.noise[0][1]
    lp = (-0.5 * xi.square() - torch.log(torch.tensor(0.1)) - 0.5 * torch.log(torch.tensor(2 * torch.pi))).mean(-1)
    torch.testing.assert_close(b.old_logprobs[0], lp.reshape(6, -1).mean(1), rtol=1e-6, atol=1e-6)


def _pg_gain(models, out, *extra):
    s = run_training(recipe(models, out, "train.algorithm=policy_gradient", "train.iterations=6",
                            "train.rollouts_per_worker=8", "train.group_size=4", "train.explore_std=0.3",
                            "train.optim.lr=3e-3", "train.num_workers=1", *extra), use_ray=False, progress=False)
    m = metrics(out)
    return sum(x["reward/total"] for x in m[-2:]) / 2 - sum(x["reward/total"] for x in m[:2]) / 2, s


def test_policy_gradient_climbs_and_a_sign_flip_does_not(models, tmp_path):
    # catches: a sign-flipped surrogate (advantage or ratio), advantages not normalised within groups.
    # Brightness on the tiny model: PG raises it by > 0.02 in 6 iterations (measured +0.023..+0.077 over
    # train.seed 0-3, +0.077 at this seed; flipped -0.037..-0.058); the user rule in fixtures/user_rules flips the loss and must lower it.
    gain, _ = _pg_gain(models, tmp_path / "pg")
    flipped, _ = _pg_gain(models, tmp_path / "flip", f"train.algorithm={RULE_FILE}:SignFlipped")
    assert gain > 0.02
    assert flipped < 0


# ------------------------------------------------------------------------------------------ the seam
def test_update_rules_are_registered_with_their_needs():
    assert set(UPDATE_RULES) >= {"reward_gradient", "policy_gradient"}
    assert UPDATE_RULES["reward_gradient"].needs_differentiable_rewards
    assert PolicyGradient.needs_exploration and PolicyGradient.needs_groups


@pytest.mark.parametrize("override,message", [
    ("train.algorithm=policy_gradeint", "unknown update rule.*did you mean 'policy_gradient'"),
    ("train.algorithm=/no/such/rule.py:Rule", "update rule.*not found"),
    (f"train.algorithm={FIX / 'user_rules' / 'broken_import.py'}:Rule", "update rule.*importing.*failed"),
    ("train.grad_last_k=0", r"train.grad_last_k must be in \[1, train.num_iter = 4\]"),
    ("train.grad_last_k=5", r"train.grad_last_k must be in \[1, train.num_iter = 4\]"),
    ("train.trainable=[heads]", "train.trainable must name some of"),
    ("train.algorithm=policy_gradient train.group_size=1", "train.group_size must be >= 2"),
    ("train.algorithm=policy_gradient train.group_size=3", "must be a multiple of train.group_size"),
    ("train.algorithm=policy_gradient train.explore_std=0", "needs train.explore_std > 0"),
    ("train.algorithm=policy_gradient train.explore_std=-1", "explore_std must be a finite number >= 0"),
    ("train.explore_steps=[9]", "train.explore_steps must be AR step indices"),
    ("train.train_backbone=true", "'train.train_backbone' is now 'train.trainable'"),
])
def test_bad_rl_input_is_one_line_exit_2(models, tmp_path, capsys, override, message):
    # catches: a traceback (or a silent run) for an ordinary mistake in the RL recipe
    import re

    r = recipe(models, tmp_path / "o")
    yaml_path = tmp_path / "r.yaml"
    from marval_rl.config import recipe_to_yaml

    yaml_path.write_text(recipe_to_yaml(r))
    code = main(["train", "--no-ray", str(yaml_path), *override.split()])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "o" / "rl_state.pt").exists()


def test_policy_ema_is_what_eval_scores_and_what_is_saved(models, tmp_path):
    # catches: an EMA that is never updated, updated with the wrong rate, or not the weights saved
    from marval_rl.models.checkpoints import load_pretrained

    r = recipe(models, tmp_path, "train.optim.ema=0.5", "train.iterations=1", "train.optim.lr=1e-2")
    from marval_rl.loading import load_generator, load_vae

    trainer = RLTrainer(load_generator(r.model), load_vae(r.vae), RewardSet(r.train.rewards), r.train)
    before = {n: v.clone() for n, v in trainer.ema.items()}
    trainer.update([_rollout(trainer, [0, 1, 2, 3])])
    live = dict(trainer.policy.named_parameters())
    for n, v in trainer.ema.items():
        torch.testing.assert_close(v, 0.5 * before[n] + 0.5 * live[n].detach(), rtol=0, atol=1e-7)
    assert any(not torch.equal(v, before[n]) for n, v in trainer.ema.items())
    run_training(r, use_ray=False, progress=False)
    saved = dict(load_pretrained(tmp_path / "policy").named_parameters())
    state = torch.load(tmp_path / "rl_state.pt", weights_only=True)["trainer"]
    for n, v in state["ema"].items():
        assert torch.equal(saved[n], v) and not torch.equal(saved[n], state["trainable"][n])


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    # catches: a shipped recipe left behind by a renamed key or a new check (the README's commands)
    from marval_rl.rl.controller import check_train_recipe

    r = load_recipe(str(path), [])
    if r.train.rewards:
        check_train_recipe(r)
