"""Update rules: how one iteration's rollouts become an optimiser step. Registered by name.

    class MyRule(UpdateRule):            # in my_rule.py, named by the recipe: train.algorithm: my_rule.py:MyRule
        needs_exploration = True         # rollouts sampled with explore_std > 0 (log-probs recorded)
        def update(self, trainer, batches) -> dict:
            ... trainer.replay(...), trainer.backward(loss) ...
            return {"my/stat": ..., "grad_norm": trainer.step()}

An update rule declares what it needs from the rollouts (``needs_exploration``, ``needs_groups``,
``needs_differentiable_rewards``); the controller checks the recipe against it before anything loads.
Everything it uses lives on the :class:`~marval_rl.rl.trainer.RLTrainer`: the policy and its frozen
reference, ``sampler`` (the one Gaussian policy sampler), ``replay`` (a rollout recomputed with
autograd from its record), ``decode``, ``rewards``, ``reward_scale`` and ``step`` (clip, all-reduce,
optimiser step).
"""
from __future__ import annotations

import difflib
from typing import ClassVar

import torch

from marval_rl.plugins import load_file_object
from marval_rl.rl.batch import RolloutBatch
from marval_rl.rl.policy import per_sample_mean, per_step_sample_mean, step_actions

UPDATE_RULES: dict[str, type["UpdateRule"]] = {}


def register_update_rule(name: str):
    def deco(cls):
        cls.name = name
        UPDATE_RULES[name] = cls
        return cls
    return deco


class UpdateRule:
    """Base of every update rule (a protocol with defaults); see the module docstring."""
    name: ClassVar[str] = ""
    needs_exploration: ClassVar[bool] = False
    needs_groups: ClassVar[bool] = False
    needs_differentiable_rewards: ClassVar[bool] = False

    def __init__(self, section):
        self.s = section

    def update(self, trainer, batches: list[RolloutBatch]) -> dict:
        raise NotImplementedError


def resolve_update_rule(name: str) -> type[UpdateRule]:
    """The class of a registered rule, or of ``path/file.py:Class`` (loaded from exactly that file)."""
    if name in UPDATE_RULES:
        return UPDATE_RULES[name]
    if ":" in name and name.rpartition(":")[0].endswith(".py"):
        cls = load_file_object(name, what="update rule")
        if not (isinstance(cls, type) and issubclass(cls, UpdateRule)):
            raise ValueError(f"train.algorithm {name!r} is not a marval_rl.rl.update_rules.UpdateRule subclass")
        return cls
    close = difflib.get_close_matches(str(name), list(UPDATE_RULES), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown update rule train.algorithm={name!r}{hint}; known: {sorted(UPDATE_RULES)}, "
                     f"or 'path/to/file.py:Class'")


@register_update_rule("reward_gradient")
class RewardGradient(UpdateRule):
    """MARVAL-RL: maximise the differentiable reward by backpropagating it through the decoder, the
    one-step head and the AR loop, replaying each rollout's noise under the current theta.

    loss = -mean(R) / sigma_R + reg_weight * mean_tokens,dims |g_theta(noise, z_theta) - g_ref(noise, z_ref)|^2
    with sigma_R the running per-sample std of R (``normalize_reward``), so reg_weight is in units of the
    reward's spread, and the regulariser compares with the reference MODEL on the visited states."""
    needs_differentiable_rewards = True

    def __init__(self, section):
        super().__init__(section)
        self._checked = False

    def update(self, trainer, batches):
        s, n = self.s, sum(len(b.class_ids) for b in batches)
        scale = trainer.reward_scale(torch.cat([b.rewards.total for b in batches]))
        stats = {"rg/reward": 0.0, "rg/anchor": 0.0, "replay_max_abs_diff": 0.0, "rg/reward_scale": scale}
        for b in batches:
            sampler = trainer.sampler(b, with_reference=s.reg_weight > 0)
            res = trainer.replay(b, sampler, grad_last_k=s.grad_last_k)
            if b.version == trainer.version:  # on-policy: the replay must be the rollout
                stats["replay_max_abs_diff"] = max(stats["replay_max_abs_diff"],
                                                   (res.tokens.detach().cpu() - b.tokens).abs().max().item())
            images, meta = trainer.decode(res.tokens), {"class_ids": b.class_ids.to(res.tokens.device)}
            if not self._checked:  # once per process: every reward must reach the images
                trainer.rewards.check_image_gradients(images, b.prompts, meta)
                self._checked = True
            total, _ = trainer.rewards.total(images, b.prompts, meta)
            loss = -(total / scale).sum()
            if s.reg_weight > 0:
                anchor = per_sample_mean(sampler.reg_rows, b.record.predicted)
                loss = loss + s.reg_weight * anchor.sum()
                stats["rg/anchor"] += anchor.sum().item() / n
            trainer.backward(loss / n)
            stats["rg/reward"] += total.sum().item() / n
        stats["grad_norm"] = trainer.step()
        return stats


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - mean_group) / (std_group + 1e-4) over consecutive groups of ``group_size`` samples."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rollouts do not split into groups of {group_size}")
    g = rewards.reshape(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + 1e-4)).reshape(-1)


@register_update_rule("policy_gradient")
class PolicyGradient(UpdateRule):
    """GRPO/PPO-style, any reward: group-normalised advantages, clipped ratios of per-dimension-mean
    log-probs of each exploring AR step's actions, recomputed on the rollout's own states.

    On-policy by default (``ppo_epochs=1``: one optimiser step per rollout batch); then the ratio is
    exactly 1 (asserted: the trainer's log-prob is the worker's, same code, same inputs) and the update
    is the group-baselined policy gradient. The optional KL is the closed-form per-dim KL to the reference."""
    needs_exploration = True
    needs_groups = True

    def update(self, trainer, batches):
        s, std = self.s, trainer.std
        adv = [group_advantages(b.rewards.total, s.group_size).clamp(-s.adv_clip, s.adv_clip) for b in batches]
        n = sum(len(b.class_ids) for b in batches)
        stats: dict = {}
        for epoch in range(s.ppo_epochs):
            ratios, log_ratios, kls = [], [], []
            for b, a in zip(batches, adv):
                dev = trainer.device
                actions = step_actions(b.tokens.to(dev), b.record.predicted, trainer.policy.patchify)
                sampler = trainer.sampler(b, actions=actions, with_reference=s.kl_weight > 0)
                trainer.replay(b, sampler)
                steps = torch.tensor(sampler.explored, device=dev)
                logp = per_step_sample_mean(sampler.logprobs, b.record.predicted)[steps]        # [K', B]
                log_ratio = logp - b.old_logprobs.to(dev)[steps]
                exact = trainer.exact_replay and b.version == trainer.version
                if epoch == 0 and exact and log_ratio.abs().max().item() > 1e-5:
                    raise RuntimeError(f"on-policy log-ratio is {log_ratio.abs().max().item():.3g}, not 0: the "
                                       f"trainer's replay differs from the rollout (non-deterministic kernels?)")
                ratio = log_ratio.exp()
                a_kb = a.to(dev).expand_as(ratio)
                clipped = ratio.clamp(1 - s.clip_range, 1 + s.clip_range)
                loss = -torch.minimum(ratio * a_kb, clipped * a_kb).mean(0).sum()
                if s.kl_weight > 0:
                    kl = per_sample_mean(sampler.reg_rows, b.record.predicted) / (2 * std ** 2)
                    loss = loss + s.kl_weight * kl.sum()
                    kls.append(kl.detach())
                trainer.backward(loss / n)
                ratios.append(ratio.detach().flatten())
                log_ratios.append(log_ratio.detach().flatten())
            grad_norm = trainer.step()
            r, lr_ = torch.cat(ratios), torch.cat(log_ratios)
            if epoch == 0:
                stats["pg/ratio_first_epoch_max_dev"] = (r - 1).abs().max().item()
            stats.update({"grad_norm": grad_norm,
                          "pg/clip_frac": ((r - 1).abs() > s.clip_range).float().mean().item(),
                          "pg/approx_kl": ((r - 1) - lr_).mean().item(),   # k3 estimator of KL(old || new)
                          "pg/adv_abs": torch.cat(adv).abs().mean().item()})
            if kls:
                stats["pg/kl"] = torch.cat(kls).mean().item()
        return stats
