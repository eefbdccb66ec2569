"""The recipe's rewards as one object, and the typed record of their values that travels in a batch.

One aggregator: :class:`rewards.composite.CompositeReward` (weighted sum of the optimised rewards, gold
rewards on detached images, never in the sum). One naming rule for metric keys, :meth:`RewardRecord.means`:
``reward/total``, ``reward/<label>`` for each optimised reward, ``gold/<label>`` for each gold reward,
with the composite's labels (the reward's ``name``; ``name#2`` for a second one of the same name).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from marval_rl.acceleration import autocast
from marval_rl.config import RewardSpec


@dataclass
class RewardRecord:
    """Per-sample reward values of one batch: the optimised total, its parts and the gold rewards."""
    total: torch.Tensor                                          # [B] weighted sum that is optimised
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> [B] raw optimised rewards
    gold: dict[str, torch.Tensor] = field(default_factory=dict)   # label -> [B] held-out rewards

    def per_sample(self) -> dict[str, torch.Tensor]:
        """Every value under its metric key (the one naming rule)."""
        return {"reward/total": self.total, **{f"reward/{k}": v for k, v in self.parts.items()},
                **{f"gold/{k}": v for k, v in self.gold.items()}}

    def means(self) -> dict[str, float]:
        return {k: v.float().mean().item() for k, v in self.per_sample().items()}

    def to(self, device) -> "RewardRecord":
        return RewardRecord(self.total.to(device), {k: v.to(device) for k, v in self.parts.items()},
                            {k: v.to(device) for k, v in self.gold.items()})

    @staticmethod
    def cat(records: list["RewardRecord"]) -> "RewardRecord":
        first = records[0]
        return RewardRecord(torch.cat([r.total for r in records]),
                            {k: torch.cat([r.parts[k] for r in records]) for k in first.parts},
                            {k: torch.cat([r.gold[k] for r in records]) for k in first.gold})


def _spec_dict(spec: RewardSpec) -> dict:
    return {"name": spec.name, "kwargs": dict(spec.kwargs), "weight": float(spec.weight)}


class RewardSet:
    """``total = sum_i w_i r_i`` over the optimised rewards; gold rewards are scored and logged only."""

    def __init__(self, optimised: list[RewardSpec], gold: list[RewardSpec] = (), device="cpu",
                 precision: str = "fp32"):
        from marval_rl.rewards.composite import CompositeReward

        if not optimised:
            raise ValueError("train.rewards is empty: name at least one reward to optimise")
        self.composite = CompositeReward([_spec_dict(s) for s in optimised], [_spec_dict(s) for s in gold])
        self.composite.to(device).eval().requires_grad_(False)
        self.device, self.precision = device, precision

    def _scoring(self):
        """Reward models run under the run's autocast; their values come back float32 (below)."""
        return autocast(self.precision, self.device)

    @property
    def differentiable(self) -> bool:
        return self.composite.differentiable

    def check_differentiable(self, why: str = "train.algorithm=reward_gradient"):
        bad = [label for label, r in zip(self.composite.labels, self.composite.members) if not r.differentiable]
        if bad:
            raise ValueError(f"{why} needs differentiable rewards, but {bad} is not; use "
                             f"train.algorithm=policy_gradient for it")

    def check_image_gradients(self, images, prompts, metadata) -> None:
        """Each optimised reward must give a non-zero gradient with respect to the images.

        A reward that declares itself differentiable but returns a value detached from the images (a
        ``.item()``, a numpy round trip, a ``torch.no_grad`` inside) would leave the reward gradient
        with only the regulariser to follow, silently; stop instead, naming the reward."""
        x = images.detach().clone().requires_grad_(True)
        for label, reward in zip(self.composite.labels, self.composite.members):
            with torch.enable_grad(), self._scoring():
                value = reward(x, prompts, metadata)
                grad = torch.autograd.grad(value.sum(), x, allow_unused=True)[0] if value.requires_grad else None
            if grad is None:
                raise ValueError(f"reward '{label}' declares itself differentiable but its value does not depend "
                                 f"on the images (no gradient reaches them): return a tensor computed from the "
                                 f"images with autograd on, or set differentiable = False and use "
                                 f"train.algorithm=policy_gradient")
            if not torch.isfinite(grad).all() or grad.abs().max().item() == 0:
                what = "not finite" if not torch.isfinite(grad).all() else "exactly zero for every image"
                raise ValueError(f"reward '{label}': its gradient with respect to the images is {what} on the "
                                 f"first batch, so the reward gradient cannot follow it (a detached or saturated "
                                 f"reward?); use train.algorithm=policy_gradient for it")

    def total(self, images, prompts, metadata) -> tuple[torch.Tensor, RewardRecord]:
        """The optimised sum (with grad when the images carry it) and its record (detached; no gold:
        the trainer's replays need only what is optimised)."""
        with self._scoring():
            total, parts = self.composite.optimised(images, prompts, metadata)
        total, parts = _full(total), {k: _full(v) for k, v in parts.items()}
        return total, RewardRecord(total.detach(), parts)

    @torch.no_grad()
    def score_all(self, images, prompts, metadata) -> RewardRecord:
        """Every value of a rollout: the optimised total, its parts and the gold rewards."""
        _, record = self.total(images, prompts, metadata)
        with self._scoring():
            gold = self.composite.gold(images, prompts, metadata)
        record.gold = {k[len("gold/"):]: _full(v) for k, v in gold.items()}
        return record


def _full(values: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 reward values as float32 (advantages and normalisers need the bits); others as they are."""
    return values.float() if values.dtype in (torch.bfloat16, torch.float16) else values
