"""LoRA adapters (peft) in RL: start at the base, merged save == adapted model, only adapters (and the named
plain groups) train, the anchor's reference is the frozen base, resume is exact, adapter in peft's format."""
import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_policy_dirs
from numerics import EPS32, EPS64, MaxActivation, count_stages, network_bound
from marval_rl import lora
from marval_rl.config import LoraSection, load_recipe
from marval_rl.models.checkpoints import load_pretrained, save_pretrained
from marval_rl.models.one_step import MARVAL
from marval_rl.rl.controller import build_trainer, run_training

REWARD_FILE = Path(__file__).parent / "fixtures" / "user_rewards" / "brightness.py"
NAMES = "[tench,goldfish,great white shark,tiger shark,hammerhead,electric ray,stingray,cock,hen,ostrich]"
LORA_HEAD = ["train.trainable=[class_embedding]", "train.lora.targets=[head]", "train.lora.rank=4",
             "train.group_lr={lora: 3e-3}"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    return make_tiny_policy_dirs(tmp_path_factory.mktemp("lora"))


def recipe(setup, out, *extra):
    return load_recipe(None, [
        f"model.checkpoint={setup / 'student'}", f"vae.checkpoint={setup / 'vae'}", f"output_dir={out}",
        f"train.rewards=[{{name: '{REWARD_FILE}:Brightness'}}]", "train.iterations=3", "train.num_workers=1",
        "train.rollouts_per_worker=4", "train.num_iter=4", "train.classes=[0,1,2,3]", f"train.class_names={NAMES}",
        "train.grid_every=0", "train.eval_per_class=0", "train.optim.lr=3e-3", "train.checkpoint_every=1",
        *LORA_HEAD, *extra])


def probe(model, seed=0, rows=3):
    """The model's outputs on a fixed random state: the condition z and the head's tokens [rows x L, C]."""
    g = torch.Generator().manual_seed(seed)
    dt = model.dtype
    tokens = torch.randn(rows, model.seq_len, model.token_embed_dim, generator=g).to(dt)
    mask = torch.zeros(rows, model.seq_len)
    mask[:, torch.randperm(model.seq_len, generator=g)[: model.seq_len // 2]] = 1
    labels = torch.randint(0, model.config.class_num, (rows,), generator=g)
    noise = torch.randn(rows * model.seq_len, model.token_embed_dim, generator=g).to(dt)
    with torch.no_grad():
        z = model.condition(tokens, mask, labels)
        return z, model.one_step(noise, z.reshape(-1, z.shape[-1]))


def adapted(student_dir, section, seed=0) -> MARVAL:
    model = load_pretrained(student_dir, expected="marval")
    lora.add_lora(model, section, "lora", seed=seed)
    return model.eval()


def randomise_adapters(model, seed=1, scale=0.05):
    """What training does to the adapters: B (zero at the start) and A move."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_adapters_start_at_the_base_exactly(setup):
    # catches: adapters whose B is not zero at the start (peft's init_lora_weights=False, or a Gaussian B):
    # the RL run would not start from the distilled student. B = 0 adds exactly +0.0: bit-equal.
    base = load_pretrained(setup / "student", expected="marval").eval()
    model = adapted(setup / "student", LoraSection(targets=["backbone", "head"], rank=4))
    assert lora.adapter_names(model) and all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters()
                                             if ".lora_B." in n)
    for a, b in zip(probe(model), probe(base)):
        assert torch.equal(a, b)


def _merged_bound(model64, eps):
    """|merged - adapted| <= 2 B: each run is within B = 3 sqrt(S) eps M of the same exact value (merging is
    exact algebra; rounding W + s B A once more is one more rounding of a Linear stage, inside sqrt(S)), M the
    largest activation of the float64 run; the head's x0 read-out multiplies its eps error by
    sqrt(1 - ab) / sqrt(ab) < 1 / sqrt(ab)."""
    with MaxActivation(model64) as mx:
        probe(model64)
    b = network_bound(mx.value, count_stages(model64), eps)
    return 2 * b, 2 * b / model64.one_step.sqrt_ab


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merged_checkpoint_equals_the_adapted_model(setup, tmp_path, dtype):
    # catches: a merge without the alpha / rank scale, or with A and B swapped / transposed (float64: off by
    # far more than 1e-13), a merged file that still needs peft to load (peft layer names in its state dict),
    # and a merge that leaves a layer unmerged
    section = LoraSection(targets=["backbone", "head"], rank=4, alpha=8)
    model = adapted(setup / "student", section).to(dtype)
    randomise_adapters(model)
    merged_dir = save_pretrained(lora.merged_copy(model), tmp_path / "merged")
    merged = load_pretrained(merged_dir, expected="marval", dtype=dtype).eval()
    plain = load_pretrained(setup / "student", expected="marval")
    assert list(merged.state_dict()) == list(plain.state_dict())   # a plain checkpoint: no peft names
    model64 = copy.deepcopy(model).double()
    tol_z, tol_x = _merged_bound(model64, EPS64 if dtype == torch.float64 else EPS32)
    (z_a, x_a), (z_m, x_m) = probe(model), probe(merged)
    assert (z_a - z_m).abs().max() <= tol_z and (x_a - x_m).abs().max() <= tol_x
    z_p, x_p = probe(plain.eval().to(dtype))
    assert (x_p - x_a).abs().max() > 100 * tol_x   # the adapters do change the outputs (the check has teeth)


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run") / "out"
    summary = run_training(recipe(setup, out), use_ray=False, progress=False)
    return out, summary


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_only_adapters_and_named_groups_train(setup, run):
    # catches: base weights left trainable under LoRA (peft freezes them, our requires_grad setup must not
    # undo it), biases of adapted layers trained, the class embedding (a named plain group) not trained, or
    # adapters that never receive a gradient
    out, _ = run
    trainer = build_trainer(recipe(setup, out))
    grads = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert grads == set(lora.adapter_names(trainer.policy)) | {"class_emb.weight"}
    assert all(n.startswith("one_step.") for n in lora.adapter_names(trainer.policy))
    base = load_pretrained(setup / "student", expected="marval").state_dict()
    merged = load_pretrained(out / "policy", expected="marval").state_dict()
    targets = {f"{t}.weight" for t in lora.resolve_targets(trainer.policy, LoraSection(targets=["head"]), "x")}
    changed = {n for n in base if not torch.equal(base[n], merged[n])}
    assert changed == targets | {"class_emb.weight"}, sorted(changed ^ (targets | {"class_emb.weight"}))[:5]
    state = torch.load(out / "rl_state.pt", weights_only=True)["trainer"]["trainable"]
    assert any(torch.count_nonzero(v) for n, v in state.items() if ".lora_B." in n)   # B moved off zero


def test_saved_policy_and_adapter_equal_the_trained_model(setup, run):
    # catches: the merged policy/ folder saved from the wrong weights (the base, or unmerged), an adapter/
    # folder peft cannot load or that lacks the fully trained class embedding (modules_to_save)
    out, _ = run
    from peft import PeftModel

    state = torch.load(out / "rl_state.pt", weights_only=True)["trainer"]["trainable"]
    model = adapted(setup / "student", LoraSection(targets=["head"], rank=4))
    model.load_state_dict(state, strict=False)
    merged = load_pretrained(out / "policy", expected="marval").eval()
    tol_z, tol_x = _merged_bound(copy.deepcopy(model).double(), EPS32)
    (z_a, x_a), (z_m, x_m) = probe(model), probe(merged)
    assert (z_a - z_m).abs().max() <= tol_z and (x_a - x_m).abs().max() <= tol_x
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["modules_to_save"] == ["class_emb"]
    peft_model = PeftModel.from_pretrained(load_pretrained(setup / "student", expected="marval").eval(),
                                           str(out / "adapter"))
    z_p, x_p = probe(peft_model.base_model.model)   # the same peft layers and weights: the same arithmetic
    assert torch.equal(z_p, z_a) and torch.equal(x_p, x_a)


def test_reference_is_the_frozen_base(setup, tmp_path):
    # catches: the anchor's reference taken from the adapted policy (adapters on, or the policy itself) or
    # from the trained class embedding, and a reference that copies the frozen base (memory of a 2nd model)
    trainer = build_trainer(recipe(setup, tmp_path, "train.group_lr={lora: 1e-3}"))
    policy, ref = trainer.policy, trainer.reference
    # train.group_lr.lora is the adapters' lr (catches: adapters taken for their plain group, at optim.lr)
    adapter_ids = {id(p) for n, p in policy.named_parameters() if ".lora_" in n}
    lrs = {g["lr"] for g in trainer.optimizer.param_groups for p in g["params"] if id(p) in adapter_ids}
    assert len(lrs) == 1 and lrs.pop() == pytest.approx(1e-3)
    assert sorted({g["lr"] for g in trainer.optimizer.param_groups}) == pytest.approx([1e-3, 3e-3])
    randomise_adapters(policy)
    with torch.no_grad():
        policy.class_emb.weight.add_(0.5)
    base = load_pretrained(setup / "student", expected="marval").eval()
    (z_r, x_r), (z_b, x_b), (z_p, x_p) = probe(ref), probe(base), probe(policy)
    assert torch.equal(z_r, z_b) and torch.equal(x_r, x_b)
    assert not torch.equal(x_p, x_b)
    assert all(layer.disable_adapters for _, layer in lora.tuner_layers(ref))   # adapters off, not dormant copies
    own = dict(policy.named_parameters())
    shared = [n for n, p in ref.named_parameters() if n not in trainer.names]
    assert shared and all(p.data_ptr() == own[n].data_ptr() for n, p in ref.named_parameters() if n in shared)


def test_anchor_is_zero_at_the_start_and_grows(run):
    # catches (end to end): an anchor against the adapted policy itself (it would stay exactly 0)
    m = metrics(run[0])
    assert m[0]["rg/anchor"] == 0.0 and m[-1]["rg/anchor"] > 0
    assert all(x["replay_max_abs_diff"] == 0.0 for x in m)   # worker (own peft layers) == trainer replay


def test_killed_lora_run_resumes_exactly(setup, run, tmp_path):
    # catches: an RL state without the adapter weights or their Adam moments (the resumed run would differ)
    straight, _ = run
    split = tmp_path / "split"
    run_training(recipe(setup, split), use_ray=False, progress=False, stop_after=1)
    run_training(recipe(setup, split), use_ray=False, progress=False)
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "rollouts_per_s"))}  # noqa: E731
    assert [drop(x) for x in metrics(straight)] == [drop(x) for x in metrics(split)]
    a = torch.load(straight / "rl_state.pt", weights_only=True)["trainer"]
    b = torch.load(split / "rl_state.pt", weights_only=True)["trainer"]
    assert a["trainable"].keys() == b["trainable"].keys()
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])


# ------------------------------------------------------------------ distillation: LoRA on the student
from test_distill import args as distill_args, pair  # noqa: E402,F401  (the tiny teacher + VAE fixture)


def test_distill_with_lora_on_the_head_saves_merged_and_resumes(pair, tmp_path, capsys):  # noqa: F811
    # catches: the student's base weights or biases trained under distill.lora, a student/ folder that
    # is not a plain checkpoint, no adapter/ beside it, and a resume without the adapters' state
    from marval_rl.cli import main

    straight, split = tmp_path / "a", tmp_path / "b"
    common = ["distill.lora.targets=[head]", "distill.lora.rank=4", "distill.checkpoint_every=1",
              "distill.generator_optim.lr=1e-2"]
    assert main(distill_args(pair, straight, *common, "distill.generator_optim.steps=3")) == 0
    assert main(distill_args(pair, split, *common, "distill.generator_optim.steps=2")) == 0
    assert main(distill_args(pair, split, *common, "distill.generator_optim.steps=3")) == 0
    capsys.readouterr()
    base_model = MARVAL.from_teacher(load_pretrained(pair / "teacher"))
    base = base_model.state_dict()
    sa = load_pretrained(straight / "student", expected="marval").state_dict()
    sb = load_pretrained(split / "student", expected="marval").state_dict()
    assert list(sa) == list(base) and all(torch.equal(sa[k], sb[k]) for k in sa)
    targets = {f"{t}.weight" for t in lora.resolve_targets(base_model, LoraSection(targets=["head"]), "x")}
    assert {n for n in base if not torch.equal(base[n], sa[n])} == targets
    assert json.loads((straight / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_distill_lora_bad_input(pair, tmp_path, capsys):  # noqa: F811
    from marval_rl.cli import main

    out = tmp_path / "out"
    assert main(distill_args(pair, out, "distill.lora.targets=[head]", "distill.train_backbone=true")) == 2
    assert "distill.lora and distill.train_backbone=true" in capsys.readouterr().err
    assert main(distill_args(pair, out, "distill.lora.targets=[qkvv]")) == 2
    err = capsys.readouterr().err
    assert "distill.lora.targets: no Linear layer of the model is named 'qkvv' (closest: qkv" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_policy_gradient_with_lora_ratio_one_and_kl_to_the_base(setup, tmp_path):
    # catches: worker and trainer adapters that differ (the on-policy ratio would not be exactly 1), and a KL
    # against the adapted policy itself (exactly 0 forever) instead of the frozen base (0, then > 0)
    run_training(recipe(setup, tmp_path, "train.algorithm=policy_gradient", "train.iterations=2",
                        "train.group_size=2", "train.explore_std=0.1", "train.kl_weight=0.1"),
                 use_ray=False, progress=False)
    m = metrics(tmp_path)
    assert all(x["pg/ratio_first_epoch_max_dev"] == 0.0 for x in m)
    assert m[0]["pg/kl"] == 0.0 and m[1]["pg/kl"] > 0
