"""The GSIM generator objective (MARVAL, arXiv 2511.15190; Score Implicit Matching, arXiv 2410.16794).

For a student sample x = g_theta(noise, c), a forward-diffused x_t = a_t x + s_t eps, the guided
teacher score s_p(x_t), the auxiliary ("fake") score S_phi(x_t) of the student's distribution and
the transition-kernel score grad log p(x_t | x) = -eps / s_t:

    y   = S_phi(x_t) - s_p(x_t)
    L   = d(y) - d'(y)^T (S_phi(x_t) - grad log p(x_t | x)),      d(y) = sqrt(|y|^2 + r^2) - r

Gradient Equivalent Theorem: with every network frozen, the autograd gradient of L w.r.t. theta
(flowing only through x_t, i.e. through the *inputs* of the frozen networks and the kernel score)
equals the gradient of the score divergence E_{q_theta,t}[d(s_q - s_p)]. This needs d'(y) to stay
a function of x_t; ``detach_dprime=True`` is the cheaper common simplification (no longer exact).
``tests/test_gsim.py`` checks the theorem on Gaussians where everything is known in closed form.
"""
from __future__ import annotations

import torch


def pseudo_huber(y: torch.Tensor, r: float, dims) -> torch.Tensor:
    """d(y) = sqrt(|y|^2 + r^2) - r, the norm taken over ``dims``."""
    return torch.sqrt(y.square().sum(dims) + r * r) - r


def gsim_loss(s_fake: torch.Tensor, s_teacher: torch.Tensor, kernel_score: torch.Tensor, r: float,
              dims=-1, detach_dprime: bool = False) -> torch.Tensor:
    """Per-item GSIM generator loss in score space (reduced over ``dims``). See the module docstring."""
    if r <= 0:
        raise ValueError(f"the pseudo-Huber constant r must be > 0, got {r}")
    y = s_fake - s_teacher
    norm = torch.sqrt(y.square().sum(dims, keepdim=True) + r * r)   # |y| kept broadcastable
    dprime = y / norm
    if detach_dprime:
        dprime = dprime.detach()
    l1 = -(dprime * (s_fake - kernel_score)).sum(dims)
    return (norm - r).reshape(l1.shape) + l1


def gsim_loss_eps(eps_fake: torch.Tensor, eps_teacher: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor,
                  r: float, dims=-1, detach_dprime: bool = False, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The same loss for eps-prediction networks: a score is -eps_hat / sigma_t (VP diffusion).

    ``sigma``: sqrt(1 - ab_t) broadcastable to the eps tensors; ``weight``: per-item w(t)."""
    loss = gsim_loss(-eps_fake / sigma, -eps_teacher / sigma, -eps / sigma, r, dims, detach_dprime)
    return loss if weight is None else loss * weight
