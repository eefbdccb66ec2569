"""The recipe's rewards as one object: the optimised weighted sum and the held-out gold rewards."""
from __future__ import annotations

import torch

from marval_rl.config import RewardSpec


class RewardSet:
    """``total = sum_i w_i r_i`` over the optimised rewards; gold rewards are scored and logged only."""

    def __init__(self, optimised: list[RewardSpec], gold: list[RewardSpec] = (), device="cpu"):
        from rewards import build_reward

        if not optimised:
            raise ValueError("train.rewards is empty: name at least one reward to optimise")
        built = [build_reward(s.name, **dict(s.kwargs)).to(device).eval() for s in optimised]
        self.optimised = [(n, s.weight, r) for n, s, r in zip(self._labels(built), optimised, built)]
        built_gold = [build_reward(s.name, **dict(s.kwargs)).to(device).eval() for s in gold]
        self.gold = list(zip(self._labels(built_gold), built_gold))
        for _, _, r in self.optimised + [(n, 0, g) for n, g in self.gold]:
            r.requires_grad_(False)

    @staticmethod
    def _labels(rewards) -> list[str]:
        """Log names: each reward's ``name``, numbered when two share one."""
        names = [r.name for r in rewards]
        return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    @property
    def differentiable(self) -> bool:
        return all(r.differentiable for _, _, r in self.optimised)

    def check_differentiable(self):
        bad = [n for n, _, r in self.optimised if not r.differentiable]
        if bad:
            raise ValueError(f"train.algorithm=reward_gradient needs differentiable rewards, but {bad} "
                             f"is not; use train.algorithm=policy_gradient for it")

    def total(self, images, prompts, metadata) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The optimised sum (with grad when the images carry it) and its components (detached)."""
        parts = {name: r(images, prompts, metadata) for name, _, r in self.optimised}
        total = sum(w * parts[name] for name, w, _ in self.optimised)
        return total, {f"reward/{k}": v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def score_all(self, images, prompts, metadata) -> dict[str, torch.Tensor]:
        total, parts = self.total(images, prompts, metadata)
        parts["total"] = total.detach()
        for name, r in self.gold:
            parts[f"gold/{name}"] = r(images, prompts, metadata).detach()
        return parts
