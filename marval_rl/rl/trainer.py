"""``RLTrainer``: recomputes rollouts with gradients from their replay records and updates the policy.

reward gradient (the paper's MARVAL-RL): replay each rollout's noise with the current theta, decode
with the (frozen) VAE, and maximise the differentiable reward, backpropagating through the decoder,
the one-step head and the AR loop (``grad_last_k`` truncates to the last k AR steps; activation
checkpointing in the backbone with ``grad_checkpointing``). Regulariser: the *anchor*
E|g_theta(noise, z) - g_ref(noise, z)|^2 on the visited states, keeping the policy near the distilled
reference. It is the squared distance the policy-gradient KL reduces to for equal-std Gaussians, it
needs no density (the reward-gradient policy is deterministic), and it costs one no-grad head call.

policy gradient (GRPO/PPO-style, any reward): tokens are Gaussian actions around g_theta; group-
normalised advantages over the G samples of one prompt; per-AR-step clipped importance ratios
against the rollout policy's log-probs; optional closed-form KL to the reference.
"""
from __future__ import annotations

import copy

import torch

from marval_rl.config import TrainSection
from marval_rl.models.one_step import MARVAL
from marval_rl.rl.batch import PolicyWeights, RolloutBatch
from marval_rl.rl.policy import ForcedActionSampler, GaussianPolicySampler, per_sample, step_actions
from marval_rl.sampling import sample_tokens
from marval_rl.training import make_optimizer


class AnchoredSampler(GaussianPolicySampler):
    """The rollout's sampler, also recording |mu - mu_ref|^2 per token row (the anchor regulariser)."""

    def __init__(self, head, explore_std, reference):
        super().__init__(head, explore_std)
        self.reference, self.rows = reference, []

    def __call__(self, z_cond, z_uncond, cfg, temperature, randn):
        noise = randn((z_cond.shape[0], self.head.token_channels))
        mu = self.head(noise * temperature, z_cond)
        with torch.no_grad():
            mu_ref = self.reference(noise * temperature, z_cond)
        self.rows.append((mu - mu_ref).square().sum(-1))
        return mu if self.std == 0 else mu + self.std * randn(tuple(mu.shape))


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - mean_group) / (std_group + 1e-4) over consecutive groups of ``group_size`` samples."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rollouts do not split into groups of {group_size}")
    g = rewards.reshape(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True, unbiased=False) + 1e-4)).reshape(-1)


class RLTrainer:
    def __init__(self, policy: MARVAL, vae, rewards, section: TrainSection):
        if not isinstance(policy, MARVAL):
            raise ValueError(f"RL starts from a MARVAL one-step policy, got a {type(policy).__name__} "
                             f"(distill a teacher first: marval-rl distill)")
        if section.algorithm not in ("reward_gradient", "policy_gradient"):
            raise ValueError(f"train.algorithm must be reward_gradient or policy_gradient, got {section.algorithm!r}")
        self.s, self.vae, self.rewards = section, vae.eval().requires_grad_(False), rewards
        self.std = explore_std(section)
        if section.algorithm == "reward_gradient":
            rewards.check_differentiable()
        self.policy = policy.train(False)  # no dropout: the replay must equal the rollout
        self.policy.config.grad_checkpointing = section.grad_checkpointing
        self.reference = copy.deepcopy(policy).requires_grad_(False)
        self.policy.requires_grad_(False)
        self.trainable = policy if section.train_backbone else policy.one_step
        self.trainable.requires_grad_(True)
        self.prefix = "" if section.train_backbone else "one_step."
        self.optimizer = make_optimizer(self.trainable, section.optim)
        self.version = 0

    def weights(self) -> PolicyWeights:
        return PolicyWeights.of(self.version, {self.prefix + k: v for k, v in self.trainable.state_dict().items()})

    # ------------------------------------------------------------------ reward gradient
    def replay_images(self, batch: RolloutBatch, sampler) -> torch.Tensor:
        res = sample_tokens(self.policy, replay=batch.record, token_sampler=sampler, grad_last_k=self.s.grad_last_k)
        return ((self.vae.decode_tokens(res.tokens) + 1) / 2).clamp(0, 1), res.tokens

    def _reward_gradient(self, batches: list[RolloutBatch]) -> dict:
        stats = {"reward_grad/total": 0.0, "reward_grad/anchor": 0.0, "replay_max_abs_diff": 0.0}
        for b in batches:
            sampler = AnchoredSampler(self.policy.one_step, self.std, self.reference.one_step)
            images, tokens = self.replay_images(b, sampler)
            if b.version == self.version:  # on-policy: the replay must be the rollout
                stats["replay_max_abs_diff"] = max(stats["replay_max_abs_diff"],
                                                   (tokens.detach().cpu() - b.tokens).abs().max().item())
            total, _ = self.rewards.total(images, b.prompts, {"class_ids": b.class_ids})
            anchor = per_sample(sampler.rows, b.record.predicted).mean()
            loss = (-total.mean() + self.s.reg_weight * anchor) / len(batches)
            loss.backward()
            stats["reward_grad/total"] += total.mean().item() / len(batches)
            stats["reward_grad/anchor"] += anchor.item() / len(batches)
        stats["grad_norm"] = self._step()
        return stats

    # ------------------------------------------------------------------ policy gradient
    def _policy_gradient(self, batches: list[RolloutBatch]) -> dict:
        adv = [group_advantages(b.rewards["total"], self.s.group_size) for b in batches]
        stats = {}
        for epoch in range(self.s.ppo_epochs):
            ratios, kls = [], []
            for b, a in zip(batches, adv):
                actions = step_actions(b.tokens, b.record.predicted, self.policy.patchify)
                sampler = ForcedActionSampler(self.policy.one_step, self.std, actions,
                                              self.reference.one_step if self.s.kl_weight > 0 else None)
                sample_tokens(self.policy, replay=b.record, token_sampler=sampler)
                preds = b.record.predicted
                logp = torch.stack([per_sample([lp], [p]) for lp, p in zip(sampler.logprobs, preds)])  # [K, B]
                ratio = torch.exp(logp - b.old_logprobs.to(logp.device))
                adv_kb = a.to(logp.device).expand_as(ratio)
                clipped = ratio.clamp(1 - self.s.clip_range, 1 + self.s.clip_range)
                loss = -torch.minimum(ratio * adv_kb, clipped * adv_kb).mean()
                if sampler.kl:
                    kl = per_sample(sampler.kl, preds).mean()
                    loss = loss + self.s.kl_weight * kl
                    kls.append(kl.item())
                (loss / len(batches)).backward()
                ratios.append(ratio.detach())
            grad_norm = self._step()
            r = torch.cat([x.flatten() for x in ratios])
            if epoch == 0:
                stats.update({"pg/ratio_first_epoch_max_dev": (r - 1).abs().max().item(),
                              "pg/ratio_mean": r.mean().item()})
            stats.update({"grad_norm": grad_norm, "pg/clip_frac": ((r - 1).abs() > self.s.clip_range).float().mean().item()})
            if kls:
                stats["pg/kl"] = sum(kls) / len(kls)
        return stats

    # ------------------------------------------------------------------------ common
    def _step(self) -> float:
        from marval_rl.rl.distributed import average_gradients, check_in_sync

        clip = self.s.optim.grad_clip
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        average_gradients(params)  # no-op in a single process
        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        check_in_sync(self.trainable)
        return float(norm)

    def update(self, batches: list[RolloutBatch]) -> dict:
        """One policy update from this iteration's rollouts; returns metrics and bumps the version."""
        lag = max(self.version - b.version for b in batches)
        if self.s.algorithm == "policy_gradient":
            if any(b.old_logprobs is None for b in batches):
                raise ValueError("policy-gradient batches need rollouts sampled with explore_std > 0")
            stats = self._policy_gradient(batches)
        else:
            stats = self._reward_gradient(batches)
        self.version += 1
        return {**stats, "version_lag": lag}

    def state_dict(self) -> dict:
        return {"trainable": self.trainable.state_dict(), "optimizer": self.optimizer.state_dict(),
                "version": self.version}

    def load_state_dict(self, state: dict):
        from marval_rl.models.checkpoints import load_state_dict_strict

        load_state_dict_strict(self.trainable, state["trainable"], "RL state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])


def explore_std(section: TrainSection) -> float:
    if section.explore_std is not None:
        return float(section.explore_std)
    return 0.05 if section.algorithm == "policy_gradient" else 0.0
