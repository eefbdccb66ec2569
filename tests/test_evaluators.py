"""Embedded evaluators: the emoji classifier and the FID-proxy (offline, CPU, ~half a minute)."""
from __future__ import annotations

import json

import pytest
import torch

from marval_rl.config import ClassifierTrainSection, DataSection, OptimSection, asset_path
from marval_rl.eval.classifier import evaluate_accuracy
from marval_rl.models.classifier import ClassifierConfig, EmojiClassifier
from marval_rl.pretrain.classifier import train_classifier
from marval_rl.eval.fid import (FIDProxy, blur3x3, compute_reference_stats, feature_moments, frechet_distance,
                                load_reference_stats)
from marval_rl.models.checkpoints import CheckpointError, load_pretrained

SHIPPED_CLASSIFIER = asset_path("embedded/classifier")
SHIPPED_FID = asset_path("embedded/fid")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained(SHIPPED_CLASSIFIER, expected="classifier")


@pytest.fixture(scope="module")
def fresh_light():
    """Held-out light renders with a seed used neither for training nor for the reference stats."""
    from marval_rl.data.emoji import EmojiDataset

    return EmojiDataset("test", image_size=32, per_class=16, seed=4242, augment="light")


# --------------------------------------------------------------------------- classifier
def test_config_roundtrip_and_unknown_key():
    cfg = ClassifierConfig(num_classes=10, widths=(8, 16, 32), feature_dim=24)
    assert ClassifierConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown ClassifierConfig key.*'width'"):
        ClassifierConfig.from_dict({"width": [8, 16]})


def test_bad_inputs_give_clear_errors():
    model = EmojiClassifier(ClassifierConfig(widths=(8, 8, 8), feature_dim=16)).eval()
    with pytest.raises(ValueError, match=r"expected images in \[0, 1\]"):
        model(torch.rand(2, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\]"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\]"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    model(torch.rand(2, 3, 32, 32) * (1 + 5e-4))  # round-off overshoot is tolerated


def test_gradient_reaches_input_pixels():
    model = EmojiClassifier(ClassifierConfig(widths=(8, 8, 8), feature_dim=16)).eval()
    for size in (32, 64):  # 64: through the antialiased resize as well
        x = torch.rand(2, 3, size, size, requires_grad=True)
        model(x)[:, 3].sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_few_step_training_writes_loadable_deterministic_checkpoint(tmp_path):
    section = ClassifierTrainSection(optim=OptimSection(steps=20, batch_size=32, lr=2e-3, warmup_steps=5,
                                                        weight_decay=0.01, ema=0.0), test_per_class=2)
    data = DataSection(per_class=4)
    logs = []
    model, metrics = train_classifier(section, data, tmp_path / "a", seed=3, progress=False, log=logs.append)
    again, _ = train_classifier(section, data, tmp_path / "b", seed=3, progress=False, log=logs.append)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["steps"] == 20 and logs
    loaded = load_pretrained(tmp_path / "a", expected="classifier")
    assert isinstance(loaded, EmojiClassifier) and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
        assert torch.equal(v, again.state_dict()[k]), f"not deterministic: {k}"
    doc = json.loads((tmp_path / "a" / "config.json").read_text())
    assert doc["architecture"] == "classifier" and doc["metadata"]["accuracy"] == metrics["accuracy"]


def test_shipped_classifier_accuracy(shipped):
    from marval_rl.data.emoji import EmojiDataset

    from pathlib import Path

    assert sum(p.numel() for p in shipped.parameters()) < 250_000
    for path in [*Path(SHIPPED_CLASSIFIER).iterdir(), *Path(SHIPPED_FID).iterdir()]:
        assert path.stat().st_size < 1_000_000, path  # shipped in the wheel: keep them small
    # A fresh seed with the training augmentation ("full": random backgrounds, rotations, flips).
    full = EmojiDataset("test", image_size=32, per_class=16, seed=777, augment="full")
    res = evaluate_accuracy(shipped, full.images, full.labels)
    assert res["accuracy"] >= 0.90, res


def test_shipped_classifier_light_renders_and_resize(shipped, fresh_light):
    res = evaluate_accuracy(shipped, fresh_light.images, fresh_light.labels)
    assert res["accuracy"] >= 0.95, res
    # Generators may emit other resolutions: 64 px renders go through the antialiased resize inside.
    from marval_rl.data.emoji import EmojiDataset

    big = EmojiDataset("test", image_size=64, per_class=4, seed=4242, augment="light")
    assert evaluate_accuracy(shipped, big.images, big.labels)["accuracy"] >= 0.95


# --------------------------------------------------------------------------- FID-proxy
def _reference_fd(mu1, s1, mu2, s2):
    """Independent float64 recomputation: eigenvalues of the (non-symmetric) product S1 S2."""
    tr = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr)


def test_frechet_distance_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    d = 32
    for _ in range(3):
        a, b = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
        s1, s2 = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64), b @ b.T / d
        mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-9)
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + ||mu1 - mu2||^2 exactly.
    va, vb = torch.rand(d, generator=g, dtype=torch.float64), torch.rand(d, generator=g, dtype=torch.float64)
    closed = float((mu1 - mu2).square().sum() + (va.sqrt() - vb.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(va), mu2, torch.diag(vb)) == pytest.approx(closed, rel=1e-12)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_fid_proxy_restores_torchmetrics_state_exactly(shipped, fresh_light, tmp_path):
    x = fresh_light.images[:300]
    compute_reference_stats(shipped, x, tmp_path, provenance={"what": "test"})
    stats = load_reference_stats(tmp_path)
    assert stats["sum"].dtype == torch.float64 and int(stats["num_samples"]) == 300
    assert stats["info"]["what"] == "test"
    fid = FIDProxy(shipped, tmp_path)
    assert fid.score(x) == pytest.approx(0.0, abs=1e-3)  # the set against itself
    y = fresh_light.images[300:600]
    m = feature_moments(shipped, y)
    expected = frechet_distance(m["mu"], m["sigma"], stats["mu"], stats["sigma"])
    assert fid.score(y) == pytest.approx(expected, rel=1e-4)
    assert fid.score(y) == fid.score(y)  # reset between calls keeps the reference


def test_shipped_fid_proxy_ranks_degradations(shipped, fresh_light):
    from marval_rl.data.emoji import EmojiDataset

    fid = FIDProxy(shipped, SHIPPED_FID)
    real = fresh_light.images.float() / 255
    n = len(real)
    subset = EmojiDataset("test", image_size=32, per_class=n // 10 + 1, seed=4242, augment="light")
    keep = subset.labels < 10  # only 10 of the 56 classes, same sample count
    dropped = (subset.images[keep].float() / 255)[:n]
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    scores = {"real": fid.score(real), "blur": fid.score(blur3x3(real)), "noise": fid.score(noise),
              "modes": fid.score(dropped)}
    assert scores["real"] < scores["blur"] < scores["noise"], scores
    assert scores["real"] * 3 < scores["modes"], scores


def test_fid_proxy_errors(shipped, tmp_path):
    with pytest.raises(FileNotFoundError, match="no FID reference statistics"):
        FIDProxy(shipped, tmp_path / "missing")
    with pytest.raises(CheckpointError):
        load_pretrained(tmp_path / "missing")
    other = EmojiClassifier().eval()  # random weights: features of another network
    with pytest.raises(ValueError, match="different classifier"):
        FIDProxy(other, SHIPPED_FID)
    fid = FIDProxy(shipped, SHIPPED_FID)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fid.score(torch.rand(4, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match="at least 2"):
        fid.score(torch.rand(1, 3, 32, 32))
