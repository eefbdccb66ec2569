"""The one training loop (training.run_loop) every non-RL trainer runs: exact resume, the lr schedule,
the weight-decay rule, the EMA, and a short resume check per stage that is not covered elsewhere
(VAE/MAR: test_pretrain.py, GSIM distillation: test_distill.py)."""
import math

import pytest
import torch
from torch import nn

from marval_rl.config import ClassifierTrainSection, ClipTrainSection, DataSection, OptimSection
from marval_rl.models.checkpoints import CheckpointError
from marval_rl.training import (EMA, LossStage, Trainable, lr_at, param_groups, run_loop,
                                save_training_state)


class Killed(RuntimeError):
    pass


class TwoPlayerStage:
    """A stage shaped like GSIM: a critic updated first, then a generator against it; dropout draws from
    torch's global RNG and the data from the run's generator, so both RNG states must survive a resume."""
    name = "toy"

    def __init__(self, kill_at=None):
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 4))
        self.critic = nn.Linear(4, 1)
        optim = dict(batch_size=8, lr=1e-2, warmup_steps=2, weight_decay=0.1, grad_clip=1.0)
        self.trainables = [Trainable("generator", self.gen, OptimSection(steps=8, ema=0.9, schedule="cosine", **optim)),
                           Trainable("critic", self.critic, OptimSection(steps=8, ema=0.0, **optim))]
        self.kill_at = kill_at

    def step(self, step, g, update):
        if step == self.kill_at:
            raise Killed(step)
        x = torch.randn(8, 4, generator=g)
        critic_loss = (self.critic(self.gen(x).detach()) - 1).square().mean()
        update("critic", critic_loss)
        self.critic.requires_grad_(False)
        gen_loss = -self.critic(self.gen(x)).mean()
        self.critic.requires_grad_(True)
        return {"gen_loss": gen_loss.item(), "grad_norm": update("generator", gen_loss),
                "critic_loss": critic_loss.item()}


def _run(stage, out, **kw):
    return run_loop(stage, out, generator=torch.Generator().manual_seed(1), log_every=1, checkpoint_every=3,
                    progress=False, **kw)


def test_killed_loop_resumes_bit_for_bit(tmp_path):
    # a resume that loses an optimiser's moments, the EMA, the run's generator or torch's global RNG
    # (dropout) gives other weights or other logged losses after the kill point
    straight, _ = _run(TwoPlayerStage(), tmp_path / "a")
    with pytest.raises(Killed):
        _run(TwoPlayerStage(kill_at=5), tmp_path / "b")        # dies after the checkpoint at step 3
    torch.manual_seed(123)                                      # the resume must restore the global RNG itself
    resumed, _ = _run(TwoPlayerStage(), tmp_path / "b")
    for name in ("generator", "critic"):
        for (k, v), w in zip(straight[name].state_dict().items(), resumed[name].state_dict().values()):
            assert torch.equal(v, w), (name, k)
    rows = [(tmp_path / d / "toy_metrics.jsonl").read_text().splitlines() for d in ("a", "b")]
    strip = [[{k: v for k, v in __import__("json").loads(r).items() if k != "seconds"} for r in rs] for rs in rows]
    assert strip[0] == strip[1] and [r["step"] for r in strip[1]] == list(range(1, 9))
    # the shipped generator is the EMA copy, not the live weights (an EMA that is never applied fails this)
    live = TwoPlayerStage()
    assert not torch.equal(straight["generator"][0].weight, live.gen[0].weight)


def test_a_state_of_another_stage_or_the_old_format_is_refused(tmp_path):
    stage = TwoPlayerStage()
    path = tmp_path / "toy_train_state.pt"
    torch.save({"step": 3, "model": {}, "optimizer": {}}, path)   # the per-trainer format before the shared loop
    with pytest.raises(CheckpointError, match="do not resume"):
        _run(stage, tmp_path)
    save_training_state(path, step=3, trainables=stage.trainables[:1], generator=torch.Generator())
    with pytest.raises(CheckpointError, match="this stage trains"):
        _run(TwoPlayerStage(), tmp_path)


def test_nonfinite_loss_names_the_trainable_and_step(tmp_path):
    model = nn.Linear(2, 1)
    stage = LossStage("nan", Trainable("model", model, OptimSection(steps=3)),
                      lambda step, g: (model.weight.sum() * float("nan"), {}))
    with pytest.raises(FloatingPointError, match=r"model loss is nan at step 0"):
        _run(stage, tmp_path)


def test_lr_schedules_against_their_formulas():
    # an off-by-one warm-up, a cosine that starts before the warm-up ends or does not reach 0 fails this
    o = OptimSection(steps=110, lr=2.0, warmup_steps=10, schedule="cosine")
    assert [lr_at(s, o) for s in (0, 4, 9)] == pytest.approx([0.2, 1.0, 2.0])
    assert lr_at(10, o) == pytest.approx(2.0)
    assert lr_at(60, o) == pytest.approx(1.0)                                  # half way: lr / 2
    assert lr_at(35, o) == pytest.approx(1.0 + math.cos(math.pi * 0.25))     # lr/2 (1 + cos(pi t))
    assert lr_at(110, o) == pytest.approx(0.0, abs=1e-12) and lr_at(500, o) == pytest.approx(0.0, abs=1e-12)
    c = OptimSection(steps=110, lr=2.0, warmup_steps=10)
    assert c.schedule == "constant" and lr_at(9, c) == pytest.approx(2.0) and lr_at(109, c) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(50, OptimSection(schedule="linear", warmup_steps=0))


def test_one_weight_decay_rule():
    # decaying a bias, a norm gain, MAR's diffusion head or CLIP's embeddings fails this
    model = nn.ModuleDict({"proj": nn.Linear(3, 3), "norm": nn.LayerNorm(3), "token_embedding": nn.Embedding(5, 3),
                           "diffloss": nn.ModuleDict({"net": nn.Linear(3, 3)})})
    decay, no_decay = param_groups(model, 0.1, ("diffloss.", "embedding"))
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in decay["params"]] == ["proj.weight"] and decay["weight_decay"] == 0.1
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["proj.bias", "norm.weight", "norm.bias", "token_embedding.weight", "diffloss.net.weight",
         "diffloss.net.bias"]) and no_decay["weight_decay"] == 0.0


def test_ema_of_parameters_and_batchnorm_statistics_against_float64():
    # an EMA that skips the BatchNorm statistics (shipping averaged weights with live statistics), or
    # lerps towards the wrong end, fails this
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    ema = EMA(model, 0.8, buffers=True)
    ref = {n: v.clone() for n, v in [*model.named_parameters(), *model.named_buffers()]}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        model(torch.randn(6, 3, dtype=torch.float64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
        for n, v in [*model.named_parameters(), *model.named_buffers()]:
            ref[n] = 0.8 * ref[n] + 0.2 * v.detach() if v.is_floating_point() else v.clone()
    shipped = ema.averaged_copy(model)
    for n, v in [*shipped.named_parameters(), *shipped.named_buffers()]:
        assert torch.allclose(v, ref[n], rtol=1e-12, atol=0), n
    assert int(shipped[1].num_batches_tracked) == 4
    # a subset (the RL trainer's trained parameters) leaves the others alone
    sub = EMA(model, 0.5, names=["0.bias"])
    assert list(sub.state_dict()) == ["0.bias"]


def _kill_after(monkeypatch, module, name, calls):
    """Make ``module.name`` raise on its ``calls``-th call (a run killed mid-way)."""
    real, count = getattr(module, name), {"n": 0}

    def dying(*a, **k):
        count["n"] += 1
        if count["n"] > calls:
            raise Killed(count["n"])
        return real(*a, **k)
    monkeypatch.setattr(module, name, dying)


@pytest.mark.parametrize("stage", ["classifier", "clip"])
def test_evaluator_stages_resume_exactly(stage, tmp_path, monkeypatch):
    # each learned evaluator runs on the shared loop: a resumed run ends on the same weights (a stage that
    # draws from an RNG the state does not hold, e.g. Python's random for the CLIP templates, fails this)
    import marval_rl.pretrain.classifier as pc
    import marval_rl.pretrain.clip as pl

    data = DataSection(per_class=2)
    optim = OptimSection(steps=4, batch_size=56, lr=2e-3, warmup_steps=1, ema=0.5, schedule="cosine")
    if stage == "classifier":
        section, train, module = ClassifierTrainSection(optim=optim, test_per_class=1), pc.train_classifier, pc
    else:
        section, train, module = ClipTrainSection(optim=optim, test_per_class=1), pl.train_embedded_clip, pl
    kw = dict(seed=1, progress=False, log=lambda *_: None, checkpoint_every=2)
    train(section, data, tmp_path / "a", **kw)
    with monkeypatch.context() as m:
        _kill_after(m, module, "flip_and_shift", 3)     # dies in step 4, after the checkpoint at step 2
        with pytest.raises(Killed):
            train(section, data, tmp_path / "b", **kw)
    train(section, data, tmp_path / "b", **kw)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_scaling_is_exact_and_clips_the_true_gradients():
    # fp16's loss scaling, exercised on CPU in float32 where scaling by a power of two is exact: a scaler
    # that is not unscaled before clipping (clips 65536x larger gradients), or whose step is skipped or
    # doubled, ends on other weights than the unscaled update
    def run(scaling):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        t = Trainable("m", model, OptimSection(steps=5, lr=1e-2, grad_clip=0.05, ema=0.0), loss_scaling=scaling)
        g = torch.Generator().manual_seed(1)
        norms = [t.update(model(torch.randn(16, 4, generator=g)).square().mean()) for _ in range(5)]
        return model, norms, t

    plain, n_plain, _ = run(False)
    scaled, n_scaled, t = run(True)
    assert t.scaler.is_enabled() and "grad_scaler" in t.state_dict()
    assert n_scaled == n_plain and max(n_plain) > 0.05          # the clip was active
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)


def test_every_pretrain_stage_is_registered_where_it_is_defined():
    # a stage named in the recipe checks but never registered would pass validation and then KeyError
    from marval_rl.pretrain import PRETRAIN_STAGES
    from marval_rl.pretrain.common import STAGES

    assert sorted(PRETRAIN_STAGES) == sorted(STAGES)
    assert all(fn.__module__ == f"marval_rl.pretrain.{name}" for name, fn in PRETRAIN_STAGES.items())
