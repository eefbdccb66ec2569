"""FID-proxy credit and gold distance: the credit's batch mean is -FD and its gradient is -grad FD; the gold
distance of a set does not depend on how the set is split into batches.

The exact checks run through a small smooth float64 feature net (a random projection and tanh), so every
tolerance comes from float64 round-off; one check runs on the shipped classifier and held-out renders.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from marval_rl.data import EmojiDataset
from marval_rl.rewards import RewardError, build_reward

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = torch.finfo(torch.float64).eps
D = 8  # feature dimension of the small net


class TanhFeatures(nn.Module):
    """float64 features tanh(W x) of 3x4x4 images: smooth, so finite differences converge."""

    num_features = D

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(48, D, generator=g, dtype=torch.float64) * 0.4)

    def features(self, images):
        return torch.tanh(images.flatten(1) @ self.w)


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def stats():
    net = TanhFeatures()
    with torch.no_grad():
        f = net.features(_images(200, 1) ** 2)  # a reference distribution the test batches are not drawn from
    return {"mu": f.mean(0), "sigma": torch.cov(f.T)}


def reward(stats, credit):
    return build_reward("fid_proxy", features=TanhFeatures(), stats=stats, credit=credit)


def mean_error(r, x) -> float:
    """|mean credit - (-FD)| / FD."""
    with torch.no_grad():
        return float((r(x).mean() + r.distance(x)).abs() / r.distance(x))


def gradient_error(r, x) -> float:
    """max |d mean(credit)/dx - d(-FD)/dx| / max |d(-FD)/dx| (torch autograd of FD itself)."""
    x = x.clone().requires_grad_(True)
    g_credit, = torch.autograd.grad(r(x).mean(), x)
    g_fd, = torch.autograd.grad(-r.distance(x), x)
    return float((g_credit - g_fd).abs().max() / g_fd.abs().max())


# n > D (full-rank covariance) and n < D (rank n - 1, the usual case for real feature nets)
@pytest.mark.parametrize("n", [12, 5])
@pytest.mark.parametrize("credit", ["jackknife", "batch"])
def test_credit_mean_and_gradient_are_minus_fd(stats, credit, n):
    # catches: a credit whose batch mean is not -FD, or whose gradient is not the FD gradient (the old LOO default)
    r, x = reward(stats, credit), _images(n, 2)
    assert r(x).dtype == torch.float64
    assert mean_error(r, x) < 1e-10
    assert gradient_error(r, x) < 1e-10


@pytest.mark.parametrize("n", [12, 5])
def test_credit_gradient_matches_central_finite_differences(stats, n):
    # catches: an autograd path that is wrong for FD itself (SVD backward, detached centring, a dropped term)
    r, x = reward(stats, "jackknife"), _images(n, 3)
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(r(xg).mean(), xg)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        v /= v.abs().max()

        def diff(h):
            with torch.no_grad():
                return float((r(x + h * v).mean() - r(x - h * v).mean()) / (2 * h))
        h = 1e-4
        d1, d2 = diff(h), diff(2 * h)
        f = float(r.distance(x).detach())
        # central difference: truncation ~ |D(2h) - D(h)| / 3; round-off <= ~100 eps |f| / h (SVD, sums)
        tol = abs(d2 - d1) + 100 * EPS * abs(f) / h
        assert abs(d1 - float((grad * v).sum())) <= tol, (d1, float((grad * v).sum()), tol)


def test_loo_credit_is_not_minus_fd(stats):
    # catches: a test that cannot fail: the leave-one-out credit (the old default) must fail both checks
    r, x = reward(stats, "loo"), _images(12, 2)
    assert mean_error(r, x) > 0.5
    assert gradient_error(r, x) > 0.1


def test_jackknife_ranks_like_leave_one_out(stats):
    # catches: a spread term with the wrong sign or scale (it must be (n - 1) x centred leave-one-out)
    x = _images(12, 5)
    with torch.no_grad():
        jack, loo = reward(stats, "jackknife")(x), reward(stats, "loo")(x)
    torch.testing.assert_close(jack - jack.mean(), 11 * (loo - loo.mean()), rtol=0, atol=1e-10 * float(loo.abs().max()))


def test_shipped_default_credit_mean_and_ranking():
    # catches: the shipped default still being a credit whose mean is not -FD, or one that cannot rank samples
    r = build_reward("fid_proxy")
    assert r.credit == "jackknife"
    x = EmojiDataset("test", image_size=32, per_class=1, seed=7, augment="light").images[:16].double() / 255
    x[5] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # one noise image
    with torch.no_grad():
        credit, fd = r(x), r.distance(x)
    assert abs(float(credit.mean() + fd)) < 1e-10 * float(fd)
    assert int(credit.argmin()) == 5


def test_distance_does_not_depend_on_batch_split(stats):
    # catches: a gold distance averaged over batches (or computed per chunk) instead of once over the whole set
    r, x = reward(stats, "jackknife"), _images(40, 6)
    with torch.no_grad():
        whole = r.distance(x, batch_size=None)
        chunked = r.distance(x, batch_size=7)
        pooled = r.distance_of_features([r.features(x[:13]), r.features(x[13:29]), r.features(x[29:])])
        per_batch = torch.stack([r.distance(x[i:i + 8]) for i in range(0, 40, 8)]).mean()
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(pooled, whole, rtol=1e-12, atol=0)
    assert abs(float(per_batch - whole)) > 0.1 * float(whole)  # the batch-averaged value is a different number


def test_errors(stats):
    # catches: bad input passing silently
    with pytest.raises(RewardError, match=r"credit must be one of jackknife, batch, loo, got 'mean'"):
        reward(stats, "mean")
    r = reward(stats, "jackknife")
    with pytest.raises(RewardError, match=r"needs batches of at least 3 images \(leave-one-out\), got 2"):
        r(_images(2, 0))
    with pytest.raises(RewardError, match=r"features must have shape \[N, 8\], got \(4, 3\)"):
        r.distance_of_features(torch.zeros(4, 3))
    with pytest.raises(RewardError, match=r"needs at least 2 images for a covariance, got 1"):
        r.distance_of_features(torch.zeros(1, D))
