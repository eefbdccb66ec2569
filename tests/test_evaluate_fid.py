"""Standard FID and Inception Score (marval_rl/eval/inception.py), offline.

The Inception is torch-fidelity's network with random weights in the published file's layout
(tests/fake_inception.py), loaded through the real loader path; FD is checked against an independent
float64 implementation (scipy.linalg.sqrtm, as pytorch-fid computes it) and analytic cases, IS against a
float64 recomputation from the logits. The numbers of the real network are not checked here (its weights
are not downloaded in tests); the pipeline around it is.
"""
import json

import numpy as np
import pytest
import torch

from fake_inception import make_inception_file, make_reference_npz

pytest.importorskip("torch_fidelity")
scipy_linalg = pytest.importorskip("scipy.linalg")

from marval_rl.eval.inception import (fid_from_features, inception_outputs, inception_score,  # noqa: E402
                                      load_inception, load_npz_stats)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_inception_file(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth")


@pytest.fixture(scope="module")
def net(weights):
    return load_inception(str(weights))[0]


def pytorch_fid_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance as pytorch-fid computes it: scipy's sqrtm of sigma1 @ sigma2, in float64."""
    covmean = scipy_linalg.sqrtm(sigma1.dot(sigma2))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def moments64(x: np.ndarray):
    """mean and unbiased covariance written out (not np.cov): (X - mu)^T (X - mu) / (n - 1)."""
    mu = x.mean(0)
    c = x - mu
    return mu, c.T @ c / (len(x) - 1)


def test_loader_path_gives_torch_fidelity_network_with_the_file_weights(weights, net):
    # catches: the loader leaving a layer at its random init (a non-strict load, a renamed key), images fed
    # as floats or truncated instead of rounded to uint8 (MAR writes PNGs with np.round), and the biased
    # logits used for IS (torch-fidelity's IS uses logits_unbiased = pool3 @ fc.weight^T, no bias)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    direct = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(weights)).eval()  # our own file
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, 0] = 0.5 / 255 + 1e-4            # rounds up, truncates down: the two must differ
    as_png = torch.from_numpy(np.round(np.clip(images.numpy(), 0, 1) * 255).astype(np.uint8))
    pool, logits = inception_outputs(net, images)
    ref_pool, ref_logits = direct(as_png)
    # the same network on the same uint8 input: identical operations, so identical floats
    assert torch.equal(pool, ref_pool) and torch.equal(logits, ref_logits)
    fc = torch.load(weights, weights_only=True)["fc.weight"].double()
    assert torch.allclose(logits.double(), pool.double() @ fc.T, rtol=1e-4, atol=1e-5 * logits.abs().max().item())
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)


def test_fid_matches_pytorch_fid_scipy_sqrtm():
    # catches: a wrong covariance normalisation (n instead of n - 1, or the raw second moment), a missing
    # factor 2 on the cross term, the sqrt of the trace instead of the trace of the sqrt, float32 statistics
    rng = np.random.default_rng(1)
    d = 64
    gen = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    ref = rng.normal(size=(500, d)) * rng.uniform(0.5, 1.5, size=d)
    mu_r, sigma_r = moments64(ref)
    ours = fid_from_features(torch.from_numpy(gen.astype(np.float32)), {"mu": mu_r, "sigma": sigma_r})
    mu_g, sigma_g = moments64(gen.astype(np.float32).astype(np.float64))
    expected = pytorch_fid_distance(mu_g, sigma_g, mu_r, sigma_r)
    # both in float64 from the same float32 features: they differ only by the eigen/sqrtm round-off,
    # ~ d * eps64 * (tr S1 + tr S2) ~ 1e-12 relative to the traces; 1e-9 leaves room for sqrtm's Schur method
    scale = np.trace(sigma_g) + np.trace(sigma_r)
    assert abs(ours - expected) <= 1e-9 * scale, (ours, expected)
    assert ours > 0.05 * scale            # a real difference of distributions, not a degenerate case


def test_fid_analytic_cases():
    # catches: a sign error in the mean term, FID not 0 for identical statistics (e.g. sigma's sqrt taken
    # elementwise), the mean term's square root taken (|d| instead of |d|^2)
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(200, 32)) * rng.uniform(0.5, 2, size=32))
    mu, sigma = moments64(x.numpy())
    tr = np.trace(sigma)
    assert abs(fid_from_features(x, {"mu": mu, "sigma": sigma})) <= 1e-9 * tr
    shift = rng.normal(size=32) * 0.7
    fd = fid_from_features(x, {"mu": mu + shift, "sigma": sigma})
    assert abs(fd - float(shift @ shift)) <= 1e-9 * (tr + shift @ shift)


def reference_is(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """IS = exp(mean_x KL(p(y|x) || p(y))) per split, in float64 from the logits, written out with
    logsumexp; the order is torch-fidelity's (and MAR's) fixed shuffle: RandomState(2020).permutation."""
    x = logits[np.random.RandomState(2020).permutation(len(logits))].astype(np.float64)
    log_p = x - x.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    scores = []
    for i in range(splits):
        lp = log_p[i * len(x) // splits:(i + 1) * len(x) // splits]
        p = np.exp(lp)
        log_py = np.log(p.mean(0))
        scores.append(np.exp((p * (lp - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_float64_recomputation():
    # catches: KL taken the wrong way round (KL(p(y) || p(y|x))), p(y) over all images instead of per split,
    # softmax over the wrong axis, the splits' mean of KL exponentiated instead of each split's
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(250, 1008)) * rng.uniform(0.5, 4, size=(250, 1))
    ours = inception_score(torch.from_numpy(logits.astype(np.float32)), splits=5)
    expected = reference_is(logits.astype(np.float32), 5)
    # float64 throughout on the same float32 logits: only summation order differs (~1e-15 relative)
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert ours[0] > 1.5 and ours[1] > 0


def test_inception_score_analytic_cases():
    # catches: exp missing (the score would be the KL, 0 and log K), splits not class-balanced in the formula
    k = 10
    assert inception_score(torch.zeros(40, 1008), splits=2)[0] == pytest.approx(1.0, abs=1e-12)
    confident = torch.full((200, 1008), -60.0)
    confident[torch.arange(200), torch.arange(200) % k] = 60.0   # p(y|x) one-hot (to e^-120), k classes
    mean, _ = inception_score(confident, splits=1)
    assert mean == pytest.approx(k, rel=1e-9)


def test_reference_stats_npz_format(tmp_path):
    # catches: float32 statistics kept (FID needs float64), the npz read with allow_pickle=True
    path = make_reference_npz(tmp_path / "ref.npz")
    stats = load_npz_stats(str(path))
    with np.load(path) as z:
        assert np.array_equal(stats["mu"], z["mu"]) and np.array_equal(stats["sigma"], z["sigma"])
    assert stats["mu"].dtype == np.float64 and stats["sigma"].shape == (2048, 2048)


def test_evaluate_command_with_fid_and_is(weights, tmp_path, capsys):
    # catches: the JSON not naming the statistics / weights files or the sample count, the table missing
    # the paper's columns, and FID in the run not being the FID of the images' saved pool3 features.
    # The reference has sigma = 0 (a point mass at mu), so FID = |mu_g - mu|^2 + tr(sigma_g) exactly,
    # checked from the saved features in float64; a 2048-d sqrtm costs a minute on a shared CPU
    from safetensors.torch import load_file

    from marval_rl.cli import main

    mu = np.random.default_rng(4).normal(size=2048) * 0.01
    ref = tmp_path / "adm_in256_stats.npz"
    np.savez(ref, mu=mu, sigma=np.zeros((2048, 2048)))
    out = tmp_path / "run"
    assert main(["evaluate", "quickstart_student", "evaluate.metrics=[fid,inception_score,accuracy,embedded_clip]",
                 "evaluate.classes=[0,1]", "evaluate.num_images=4", "evaluate.is_splits=2", "sample.num_iter=2",
                 f"evaluate.inception_weights={weights}", f"evaluate.reference_stats={ref}",
                 f"output_dir={out}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    row = json.loads(lines[-1])
    assert row == json.loads((out / "evaluate" / "evaluate.json").read_text())
    assert row["reference_stats"] == str(ref.resolve()) and row["inception_weights"] == str(weights.resolve())
    assert row["images"] == 4 and row["s_per_image"] > 0 and row["inception_score"] >= 1
    header = next(x for x in lines if x.startswith("| generator"))
    assert all(f"| {c} |" in header for c in ("images", "FID", "IS", "s/image", "accuracy", "embedded_clip"))
    chunk = load_file(str(out / "evaluate" / "chunks" / "chunk_00000.safetensors"))
    mu_g, sigma_g = moments64(chunk["pool3"].double().numpy())
    expected = float((mu_g - mu) @ (mu_g - mu) + np.trace(sigma_g))
    # torch-fidelity's eigvals of sigma_g @ 0 are exactly 0; the rest is float64 sums of 2048 terms
    assert row["fid"] == pytest.approx(expected, rel=1e-10)
    assert row["inception_score"] == pytest.approx(reference_is(chunk["logits_unbiased"].numpy(), 2)[0], rel=1e-12)
    # a registry reward as a metric: its mean over the images, each scored against its class's prompt
    assert row["rewards"] == ["embedded_clip"] and chunk["reward.embedded_clip"].shape == (4,)
    assert row["embedded_clip"] == pytest.approx(chunk["reward.embedded_clip"].mean().item(), rel=1e-12)
