"""Composite reward: a weighted sum of normalised rewards, plus held-out "gold" rewards that are only logged.

    reward = build_reward("composite", rewards=[
                 {"name": "embedded_clip", "weight": 1.0},
                 {"name": "classifier", "weight": 0.5, "normalize": "fixed", "scale": 0.2, "shift": 0.5}],
             gold=["fid_proxy"], normalize="running")
    total = reward(images, prompts, {"class_ids": ids})        # [B]: sum_k w_k * norm_k(r_k)
    reward.last_components  # {"embedded_clip": [B], "classifier": [B], "gold/fid_proxy": [B], "total": [B]}

Normalisation per component (``normalize`` on the entry, else the composite's default):

* ``"none"``: the raw value;
* ``"fixed"``: ``(r - shift) / scale`` with the entry's ``shift`` (0) and ``scale`` (1);
* ``"running"``: ``(r - mean) / (std + eps)`` with running statistics over every batch seen so far
  (exponential, rate ``max(momentum, 1 / batches_seen)``; updated before use, never differentiated).

Gold rewards guard against reward hacking: they are computed under ``no_grad`` on detached images, recorded
in ``last_components`` under ``gold/<name>``, and never enter the optimised sum (whatever their weight).
``differentiable`` is True only if every optimised component is; ``set_level`` if any is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import RewardError, RewardFile, RewardModel

__all__ = ["CompositeReward"]

NORMALIZERS = ("none", "fixed", "running")


class CompositeReward(RewardModel):
    name = "composite"
    frozen = True

    @classmethod
    def required_files(cls, kwargs):
        """Every member's files, keyed ``rewards[i].KWARG`` / ``gold[i].KWARG``."""
        from .registry import resolve_reward_class

        files = []
        for group in ("rewards", "gold"):
            for i, spec in enumerate(kwargs.get(group) or []):
                if isinstance(spec, str):
                    spec = {"name": spec}
                if not isinstance(spec, dict):   # an already built reward: nothing left to read
                    continue
                member = resolve_reward_class(spec.get("name", ""), kwargs.get("base_dir"))
                files += [RewardFile(f"{group}[{i}].{f.kwarg}", f.spec, f.kind, f.filename)
                          for f in member.required_files(dict(spec.get("kwargs") or {}))]
        return files

    def __init__(self, rewards: list, gold: list | None = None, normalize: str = "none", momentum: float = 0.01,
                 eps: float = 1e-6, base_dir: str | Path | None = None, name: str = "composite"):
        super().__init__()
        from .registry import build_reward

        if not rewards:
            raise RewardError("composite: needs at least one reward in rewards=[...]")
        if normalize not in NORMALIZERS:
            raise RewardError(f"composite: normalize must be one of {NORMALIZERS}, got {normalize!r}")
        self.name = name
        self.members = nn.ModuleList()
        self.gold_members = nn.ModuleList()
        self.labels: list[str] = []
        self.gold_labels: list[str] = []
        self.weights: list[float] = []
        self.norms: list[dict[str, Any]] = []
        used: set[str] = set()

        def label_for(spec: Any, reward: RewardModel, prefix: str = "") -> str:
            base = (spec.get("label") if isinstance(spec, dict) else None) or reward.name
            label, k = prefix + base, 2
            while label in used:
                label, k = f"{prefix}{base}#{k}", k + 1
            used.add(label)
            return label

        for spec in rewards:
            reward = build_reward(spec, base_dir=base_dir) if not isinstance(spec, RewardModel) else spec
            opts = spec if isinstance(spec, dict) else {}
            mode = opts.get("normalize", normalize)
            if mode not in NORMALIZERS:
                raise RewardError(f"composite: normalize must be one of {NORMALIZERS}, got {mode!r} for {reward.name!r}")
            weight = float(opts.get("weight", 1.0))
            scale = float(opts.get("scale", 1.0))
            if mode == "fixed" and scale == 0:
                raise RewardError(f"composite: scale must be non-zero for {reward.name!r}")
            self.members.append(reward)
            self.labels.append(label_for(spec, reward))
            self.weights.append(weight)
            self.norms.append({"mode": mode, "scale": scale, "shift": float(opts.get("shift", 0.0))})
        for spec in gold or []:
            reward = build_reward(spec, base_dir=base_dir) if not isinstance(spec, RewardModel) else spec
            self.gold_members.append(reward)
            self.gold_labels.append(label_for(spec, reward, "gold/"))
        k = len(self.members)
        self.register_buffer("run_mean", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("run_var", torch.ones(k, dtype=torch.float64))
        self.register_buffer("run_count", torch.zeros(k, dtype=torch.long))
        self.momentum, self.eps = float(momentum), float(eps)
        self.differentiable = all(r.differentiable for r in self.members)
        self.set_level = any(r.set_level for r in self.members) or any(r.set_level for r in self.gold_members)
        every = list(self.members) + list(self.gold_members)
        self.requires_prompts = any(r.requires_prompts for r in every)
        self.requires_class_ids = any(r.requires_class_ids for r in every)
        self.last_components: dict[str, torch.Tensor] = {}
        self.freeze()

    @property
    def device(self) -> torch.device:
        for r in self.members:
            return r.device
        return torch.device("cpu")

    def describe(self) -> dict:
        return {**super().describe(),
                "components": [{"label": lab, "weight": w, **n, **r.describe()}
                               for lab, w, n, r in zip(self.labels, self.weights, self.norms, self.members)],
                "gold": [{"label": lab, **r.describe()} for lab, r in zip(self.gold_labels, self.gold_members)]}

    @torch.no_grad()
    def _update_running(self, k: int, values: torch.Tensor) -> None:
        v = values.detach().double().to(self.run_mean.device)
        count = int(self.run_count[k]) + 1
        rate = max(self.momentum, 1.0 / count)
        mean_b = v.mean()
        var_b = v.var(unbiased=False) if v.numel() > 1 else torch.zeros((), dtype=v.dtype, device=v.device)
        if count == 1:
            self.run_mean[k], self.run_var[k] = mean_b, var_b
        else:
            delta = mean_b - self.run_mean[k]
            self.run_mean[k] += rate * delta
            self.run_var[k] = (1 - rate) * (self.run_var[k] + rate * delta ** 2) + rate * var_b
        self.run_count[k] = count

    def _normalize(self, k: int, values: torch.Tensor) -> torch.Tensor:
        n = self.norms[k]
        if n["mode"] == "fixed":
            return (values - n["shift"]) / n["scale"]
        if n["mode"] == "running":
            self._update_running(k, values)
            mean = self.run_mean[k].to(values.device, values.dtype)
            std = self.run_var[k].clamp(min=0).sqrt().to(values.device, values.dtype)
            return (values - mean) / (std + self.eps)
        return values

    def optimised(self, images, prompts, metadata) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum (with grad when the images carry it) and each member's raw value (detached)."""
        comps: dict[str, torch.Tensor] = {}
        total = None
        for k, (label, weight, reward) in enumerate(zip(self.labels, self.weights, self.members)):
            raw = reward(images, prompts, metadata)
            comps[label] = raw.detach()
            term = weight * self._normalize(k, raw.to(torch.promote_types(raw.dtype, torch.float32)))  # fp64 stays fp64
            total = term if total is None else total + term
        return total, comps

    @torch.no_grad()
    def gold(self, images, prompts, metadata) -> dict[str, torch.Tensor]:
        """The gold rewards (``gold/<name>``) on the detached images: scored, never optimised."""
        x = images.detach()
        return {label: reward(x, prompts, metadata).detach()
                for label, reward in zip(self.gold_labels, self.gold_members)}

    def score(self, images, prompts, metadata):
        total, comps = self.optimised(images, prompts, metadata)
        comps.update(self.gold(images, prompts, metadata))
        comps["total"] = total.detach()
        self.last_components = comps
        return total

    def components(self, images, prompts=None, metadata=None) -> dict[str, torch.Tensor]:
        """Every component (raw values), the gold rewards (``gold/<name>``) and ``total``, for logging."""
        self(images, prompts, metadata)
        return dict(self.last_components)
