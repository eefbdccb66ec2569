"""The one-step policy as an RL policy: Gaussian token actions, their log-probabilities, and what trains.

At every AR step the student proposes mu = g_theta(noise, z) for each token it unmasks. The action is
a = mu + std * xi (``train.explore_std``; 0 = the deterministic student), so log pi(a | state) is an
exact Gaussian density. :class:`GaussianPolicySampler` is the ONE sampler of both sides: the rollout
worker draws with it, and the trainer replays the record through it, either letting the tokens move
with theta (reward gradient) or feeding the recorded actions back (policy gradient). Its log-probs are
computed by the same code on both sides, so on-policy the trainer's log-prob equals the worker's bit
for bit (ratio exactly 1).

Units (why means, not sums): a log-prob summed over (tokens x 16) dims at std 0.05 swings by
hundreds per update, so PPO ratios leave any clip range after one step. Like DDPO and Flow-GRPO we use
the per-dimension *mean* log-density of each AR step's action; the anchor / KL regulariser is a
per-dimension mean too, so its weight does not scale with the number of tokens.

:class:`PolicyView` is the policy as the AR loop sees it during RL: it returns the condition
z_theta and, when the regulariser needs it, the *reference model's* condition z_ref on the same
state, concatenated on the feature axis, so a trained backbone or class embedding is compared with
the reference model and not only with the reference head.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from marval_rl.models.one_step import MARVAL

# trainable parameter groups (``train.trainable``): name -> predicate on the parameter's name
TRAINABLE_GROUPS = {
    "head": lambda n: n.startswith("one_step."),
    "class_embedding": lambda n: n.startswith("class_emb."),
    "backbone": lambda n: not n.startswith(("one_step.", "class_emb.")),
    "all": lambda n: True,
}


def trainable_names(policy: MARVAL, groups, allow_empty: bool = False) -> list[str]:
    """Parameter names of the groups in ``groups`` (see TRAINABLE_GROUPS), in the model's order.

    ``allow_empty``: no group is fine (LoRA adapters alone train, ``train.lora``)."""
    groups = list(groups)
    bad = [g for g in groups if g not in TRAINABLE_GROUPS]
    if bad or not (groups or allow_empty):
        raise ValueError(f"train.trainable must name some of {sorted(TRAINABLE_GROUPS)}, got {groups}")
    return [n for n, _ in policy.named_parameters() if any(TRAINABLE_GROUPS[g](n) for g in groups)]


def gaussian_logprob(a: torch.Tensor, mu: torch.Tensor, std: float) -> torch.Tensor:
    """Per-dimension mean of log N(a; mu, std^2) over the token channels -> [N]."""
    return (-0.5 * ((a - mu) / std).square() - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(-1)


class PolicyView:
    """The policy for ``sample_tokens`` in RL: [z_theta | z_ref] conditions, context optionally detached.

    ``reference``: a frozen copy of the starting model, or None when the trained part is the head only
    (then z_ref = z_theta and the reference head alone is needed). ``detach_context``: the tokens of
    earlier AR steps enter the backbone detached, so each token's reward gradient flows only through its
    own AR step (no chaotic path through later states)."""

    def __init__(self, policy: MARVAL, reference: MARVAL | None = None, detach_context: bool = False):
        self.policy, self.reference, self.detach_context = policy, reference, detach_context

    def __getattr__(self, name):  # everything else (seq_len, patchify, sample_orders, ...) is the policy's
        return getattr(self.policy, name)

    def condition(self, tokens, mask, labels):
        ctx = tokens.detach() if self.detach_context else tokens
        z = self.policy.condition(ctx, mask, labels)
        if self.reference is None:
            return z
        # with a detached context z_ref depends on nothing that trains: no graph is needed (exact, cheaper)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_context):
            z_ref = self.reference.condition(ctx, mask, labels)
        return torch.cat([z, z_ref], -1)


class GaussianPolicySampler:
    """Token sampler: a = g_theta(noise, z) + std * xi at exploring AR steps, a = mu elsewhere.

    Draws per AR step, in order: head noise, then xi (only at exploring steps). With ``group_size`` G
    and ``share_noise`` the G consecutive samples of a group share their head noise (their orders are
    shared by the worker), so only the exploration noise differs inside a group: the group's reward
    spread is then credited to what the log-probability measures.

    ``actions``: replay mode for policy gradient; the recorded actions are fed back instead of drawn.
    ``reference_head``: when given, ``reg_rows`` collects |mu - mu_ref|^2 (per-dimension mean) per row,
    with mu_ref = g_ref(noise, z_ref) on the same state; computed WITH autograd through the state (the
    reference's own weights are frozen), so the regulariser's gradient is exact.
    After a generation: ``logprobs[k]`` [rows] and ``explored[k]`` per AR step, ``reg_rows[k]``."""

    def __init__(self, head: nn.Module, explore_std: float = 0.0, explore_steps=(), group_size: int = 1,
                 share_noise: bool = False, actions: list[torch.Tensor] | None = None,
                 reference_head: nn.Module | None = None, bsz: int | None = None):
        if explore_std < 0 or not math.isfinite(explore_std):
            raise ValueError(f"explore_std must be a finite number >= 0, got {explore_std}")
        if actions is not None and explore_std <= 0:
            raise ValueError("policy-gradient updates need explore_std > 0 (a deterministic policy has no density)")
        self.head, self.std, self.explore_steps = head, float(explore_std), set(int(k) for k in explore_steps)
        self.group_size, self.share_noise = int(group_size), bool(share_noise) and group_size > 1
        self.actions, self.reference_head = actions, reference_head
        self.logprobs: list[torch.Tensor] = []
        self.explored: list[bool] = []
        self.reg_rows: list[torch.Tensor] = []
        self.bsz = bsz   # samples per generation; needed only to share noise within groups

    def explores(self, step: int) -> bool:
        return self.std > 0 and (not self.explore_steps or step in self.explore_steps)

    def _head_noise(self, rows: int, randn) -> torch.Tensor:
        C = self.head.token_channels
        if not self.share_noise:
            return randn((rows, C))
        # rows are batch-major with the same count per sample; a group is G consecutive samples
        if self.bsz is None or rows % self.bsz or self.bsz % self.group_size:
            raise ValueError(f"shared head noise needs bsz (a multiple of group_size {self.group_size}) "
                             f"dividing the {rows} token rows; got bsz={self.bsz}")
        per_group = randn((rows // self.group_size, C)).reshape(self.bsz // self.group_size, rows // self.bsz, C)
        return per_group.repeat_interleave(self.group_size, 0).reshape(rows, C)

    def __call__(self, z_cond, z_uncond, cfg, temperature, randn):
        if z_uncond is not None:
            raise ValueError("a MARVAL policy has guidance distilled in: roll it out with cfg=1")
        step = len(self.explored)
        D = self.head.net.z_channels  # [z_theta | z_ref] from PolicyView when the reference model is needed
        z, z_ref = (z_cond[:, :D], z_cond[:, D:]) if z_cond.shape[-1] > D else (z_cond, z_cond)
        noise = self._head_noise(z.shape[0], randn)
        # under autocast the head computes in bf16/fp16; actions and log-probs are taken at least in the
        # noise's float32, so the density and the PPO ratio keep their bits (a float64 model stays float64)
        mu = self.head(noise * temperature, z)
        full = torch.promote_types(mu.dtype, noise.dtype)
        mu = mu.to(full)
        if self.reference_head is not None:
            mu_ref = self.reference_head(noise * temperature, z_ref).to(full)
            self.reg_rows.append((mu - mu_ref).square().mean(-1))
        explore = self.explores(step)
        self.explored.append(explore)
        if not explore:
            self.logprobs.append(torch.zeros(mu.shape[0], device=mu.device, dtype=mu.dtype))
            return mu
        xi = randn(tuple(mu.shape))
        if self.actions is not None:
            a = self.actions[step].to(device=mu.device, dtype=mu.dtype)
            if a.shape != mu.shape:
                raise ValueError(f"recorded actions of step {step} have shape {tuple(a.shape)}, expected {tuple(mu.shape)}")
        else:
            a = mu + self.std * xi
        self.logprobs.append(gaussian_logprob(a, mu, self.std))
        return a

def step_actions(tokens: torch.Tensor, predicted: list[torch.Tensor], patchify) -> list[torch.Tensor]:
    """Split a rollout's final tokens [B, C, h, w] into the actions of each AR step (loop row order)."""
    flat = patchify(tokens)
    return [flat[p.nonzero(as_tuple=True)] for p in predicted]


def per_sample_mean(rows: list[torch.Tensor], predicted: list[torch.Tensor]) -> torch.Tensor:
    """Mean over each sample's rows of all AR steps (one tensor of per-row values per step) -> [B]."""
    bsz = predicted[0].shape[0]
    total = torch.zeros(bsz, device=rows[0].device, dtype=rows[0].dtype)
    count = torch.zeros(bsz, device=rows[0].device, dtype=rows[0].dtype)
    for r, p in zip(rows, predicted):
        idx = p.nonzero(as_tuple=True)[0].to(r.device)
        total = total.index_add(0, idx, r)
        count = count.index_add(0, idx, torch.ones_like(r))
    return total / count.clamp(min=1)


def per_step_sample_mean(rows: list[torch.Tensor], predicted: list[torch.Tensor]) -> torch.Tensor:
    """Mean over each sample's rows within each AR step -> [K, B] (0 where a sample predicts nothing)."""
    return torch.stack([per_sample_mean([r], [p]) for r, p in zip(rows, predicted)])
