"""Rewards: one interface (:class:`RewardModel`) for CLIP score, PickScore, ImageReward, FID-proxy,
classifier probability, composites and user classes; :func:`build_reward` resolves recipe specs.

    from marval_rl.rewards import RewardModel, build_reward, RewardError
    reward = build_reward("embedded_clip")
    r = reward(images, prompts)            # images float [B, 3, H, W] in [0, 1] -> tensor [B]

See docs/rewards.md.
"""
from .base import RewardError, RewardModel
from .registry import REWARDS, build_reward, known_rewards, resolve_reward_class

__all__ = ["RewardModel", "RewardError", "build_reward", "REWARDS", "known_rewards", "resolve_reward_class"]
