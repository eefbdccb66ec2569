"""The one-step policy as an RL policy: Gaussian token actions with exact log-probabilities.

At every AR step the student proposes mu = g_theta(noise, z) for each token it unmasks. The action is
a = mu + std * xi (``explore_std``; 0 = the deterministic student), so log pi(a | state) is an exact
Gaussian density. Both draws (noise, then xi) go through the AR loop's RandomStream, so a rollout's
record replays the trajectory exactly.

Two ways to recompute a rollout with gradients (``marval_rl.sampling.sample_tokens(replay=...)``):
* reward gradient: ``GaussianPolicySampler`` again: same noise and xi, new theta, so the tokens (and
  every later state) move with theta, and d reward / d theta flows through all K steps;
* policy gradient: ``ForcedActionSampler``: the recorded actions are fed back (the states are the
  rollout's), and the sampler accumulates log pi_theta(a_recorded | state) and the closed-form KL to
  a reference head on the same states.
"""
from __future__ import annotations

import math

import torch

from marval_rl.models.one_step import OneStepHead


def gaussian_logprob(a: torch.Tensor, mu: torch.Tensor, std: float) -> torch.Tensor:
    """log N(a; mu, std^2 I) summed over the token channels -> [N]."""
    return (-0.5 * ((a - mu) / std).square() - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


class GaussianPolicySampler:
    """Token sampler: a = g_theta(noise, z) + explore_std * xi (draws: noise, then xi if std > 0)."""

    def __init__(self, head: OneStepHead, explore_std: float = 0.0):
        if explore_std < 0:
            raise ValueError(f"explore_std must be >= 0, got {explore_std}")
        self.head, self.std = head, explore_std

    def __call__(self, z_cond, z_uncond, cfg, temperature, randn):
        if z_uncond is not None:
            raise ValueError("a MARVAL policy has guidance distilled in: roll it out with cfg=1")
        noise = randn((z_cond.shape[0], self.head.token_channels))
        mu = self.head(noise * temperature, z_cond)
        if self.std == 0:
            return mu
        return mu + self.std * randn(tuple(mu.shape))


class ForcedActionSampler:
    """Replays recorded actions while scoring them under the current head (policy gradient).

    ``actions[k]``: the tokens the rollout produced at AR step k (rows in the loop's order).
    After the replay, ``logprobs[k]`` holds log pi_theta per row and ``kl[k]`` the closed-form
    KL(pi_theta || pi_ref) per row when a reference head is given (same std, so |mu - mu_ref|^2 / 2std^2).
    """

    def __init__(self, head: OneStepHead, explore_std: float, actions: list[torch.Tensor],
                 reference: OneStepHead | None = None):
        if explore_std <= 0:
            raise ValueError("policy-gradient updates need explore_std > 0 (a deterministic policy has no density)")
        self.head, self.std, self.actions, self.reference = head, explore_std, actions, reference
        self.logprobs: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []

    def __call__(self, z_cond, z_uncond, cfg, temperature, randn):
        k = len(self.logprobs)
        noise = randn((z_cond.shape[0], self.head.token_channels))
        randn((z_cond.shape[0], self.head.token_channels))  # xi: consumed to stay in step with the record
        mu = self.head(noise * temperature, z_cond)
        a = self.actions[k].to(mu.dtype)
        if a.shape != mu.shape:
            raise ValueError(f"recorded actions of step {k} have shape {tuple(a.shape)}, expected {tuple(mu.shape)}")
        self.logprobs.append(gaussian_logprob(a, mu, self.std))
        if self.reference is not None:
            with torch.no_grad():
                mu_ref = self.reference(noise * temperature, z_cond)
            self.kl.append((mu - mu_ref).square().sum(-1) / (2 * self.std ** 2))
        return a


def step_actions(tokens: torch.Tensor, predicted: list[torch.Tensor], patchify) -> list[torch.Tensor]:
    """Split a rollout's final tokens [B, C, h, w] into the actions of each AR step (loop row order)."""
    flat = patchify(tokens)
    return [flat[p.nonzero(as_tuple=True)] for p in predicted]


def per_sample(rows: list[torch.Tensor], predicted: list[torch.Tensor]) -> torch.Tensor:
    """Sum per-row quantities (one tensor per AR step) into one value per sample -> [B]."""
    bsz = predicted[0].shape[0]
    out = torch.zeros(bsz, device=rows[0].device, dtype=rows[0].dtype)
    for r, p in zip(rows, predicted):
        out = out.index_add(0, p.nonzero(as_tuple=True)[0], r)
    return out
