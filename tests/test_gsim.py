"""Gradient Equivalent Theorem on Gaussians: autograd of the GSIM surrogate == the true gradient.

Student q_theta = N(mu, sig^2) per dimension (x = mu + sig * z), teacher p = N(m, v). Under the VP
forward process x_t = a x + s eps every score is linear and known in closed form, so the score
divergence F(theta) = E_{x_t ~ q_t}[ d(s_q(x_t) - s_p(x_t)) ] can be integrated exactly
(Gauss-Hermite in float64) and differentiated by central finite differences. The surrogate's
gradient is integrated over (z, eps) with the same quadrature (independent nodes per dimension: the
pseudo-Huber norm couples dimensions), so both sides are deterministic.
"""
import numpy as np
import pytest
import torch

from marval_rl.distill.gsim import gsim_loss, gsim_loss_eps, pseudo_huber

A, S = 0.6, 0.8          # a_t, s_t (a^2 + s^2 = 1)
M, V = torch.tensor([0.7, -1.1], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)


def nodes(n=16):
    x, w = np.polynomial.hermite_e.hermegauss(n)  # probabilists' Hermite: weight exp(-x^2/2)
    return torch.tensor(x), torch.tensor(w / w.sum())


def grid():
    """Tensor-product quadrature over independent (z1, z2, eps1, eps2): nodes [P, 2] x 2, weights [P]."""
    x, w = nodes()
    pts = torch.cartesian_prod(x, x, x, x)
    wts = torch.cartesian_prod(w, w, w, w).prod(1)
    return pts[:, :2], pts[:, 2:], wts


def scores(xt, mu, sig):
    s_q = -(xt - A * mu) / (A * A * sig * sig + S * S)
    s_p = -(xt - A * M) / (A * A * V + S * S)
    return s_q, s_p


def true_objective(theta, r, sq_l2):
    """F(theta) by quadrature over (z, eps); x_t = A(mu + sig z) + S eps has law q_t."""
    mu, sig = theta[:2], theta[2:].exp()
    z, e, wz = grid()
    xt = A * (mu + sig * z) + S * e
    s_q, s_p = scores(xt, mu, sig)
    y = s_q - s_p
    d = 0.5 * y.square().sum(1) if sq_l2 else pseudo_huber(y, r, 1)
    return (wz * d).sum()


def surrogate_grad(theta, r, sq_l2, detach_dprime=False):
    theta = theta.clone().requires_grad_(True)
    mu, sig = theta[:2], theta[2:].exp()
    z, e = grid()[:2]
    wz = grid()[2]
    xt = A * (mu + sig * z) + S * e
    s_fake, s_teacher = scores(xt, mu.detach(), sig.detach())   # networks frozen: sg[theta]
    kernel = -e / S
    if sq_l2:  # d = |y|^2 / 2: d' = y, the KL-type special case
        y = s_fake - s_teacher
        per = 0.5 * y.square().sum(1) - (y * (s_fake - kernel)).sum(1)
    else:
        per = gsim_loss(s_fake, s_teacher, kernel, r, dims=1, detach_dprime=detach_dprime)
    (wz * per).sum().backward()
    return theta.grad


def fd_grad(theta, r, sq_l2, h=1e-5):
    g = torch.zeros_like(theta)
    for i in range(len(theta)):
        d = torch.zeros_like(theta)
        d[i] = h
        g[i] = (true_objective(theta + d, r, sq_l2) - true_objective(theta - d, r, sq_l2)) / (2 * h)
    return g


THETA = torch.tensor([0.2, 0.4, np.log(0.9), np.log(1.3)], dtype=torch.float64)


@pytest.mark.parametrize("sq_l2,r", [(True, 0.0), (False, 0.5), (False, 1e-2)])
def test_gradient_equivalence(sq_l2, r):
    torch.testing.assert_close(surrogate_grad(THETA, r, sq_l2), fd_grad(THETA, r, sq_l2), rtol=1e-5, atol=1e-7)


def test_detached_dprime_is_not_the_exact_gradient():
    """Detaching d'(y) changes the gradient (documented as an approximation, off by default)."""
    exact = fd_grad(THETA, 0.5, False)
    approx = surrogate_grad(THETA, 0.5, False, detach_dprime=True)
    assert (approx - exact).abs().max() > 1e-3


def test_eps_form_equals_score_form():
    g = torch.Generator().manual_seed(0)
    ef, et, e = (torch.randn(5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.rand(5, 1, generator=g, dtype=torch.float64) + 0.1
    a = gsim_loss_eps(ef, et, e, sigma, r=1e-5)
    b = gsim_loss(-ef / sigma, -et / sigma, -e / sigma, 1e-5)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="r must be > 0"):
        gsim_loss(ef, et, e, r=0.0)
