"""The judge of an RL run: a fixed evaluation set scored at the start, every ``eval_every`` iterations
and at the end, in units of its own per-sample spread, beside a ceiling measured on real images.

* Prompts and seeds: every class x ``train.eval_per_class`` with fixed seeds, sampled from the
  deterministic policy (no exploration noise), so two evaluations differ only by the weights.
* Every optimised and gold reward: mean and per-sample std.
* Anti-hacking measures (embedded default): ``fid_proxy`` of the whole eval set against the shipped
  reference statistics (one Frechet distance over all N images, so it does not depend on how the set is
  split into batches; compare runs at equal N), and ``diversity``: the mean within-class spread of the
  embedded classifier's penultimate features (mean squared distance to the class centroid).
* Ceiling (``train.eval_real=auto``): the same rewards on held-out real renders of the eval classes.
  ``gap_closed`` = (last - first) / (real - first) is how much of that gap RL closed without hacking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from marval_rl.rl.batch import RolloutRequest
from marval_rl.rl.rewards import RewardRecord

EVAL_SEED = 10_007
REAL_SEED = 1          # held-out renders (test split, seed 1): not the FID reference's seed 0


@dataclass
class EvalPoint:
    iteration: int
    scores: dict[str, torch.Tensor]              # metric key -> [N] per-sample values
    images: torch.Tensor | None = None           # [N, 3, H, W] uint8
    fid_proxy: float | None = None
    spread: float | None = None                  # within-class feature spread (diversity before normalising)

    def means(self) -> dict[str, float]:
        return {k: v.float().mean().item() for k, v in self.scores.items()}

    def stds(self) -> dict[str, float]:
        return {k: v.float().std().item() if v.numel() > 1 else 0.0 for k, v in self.scores.items()}

    def log_row(self, first: "EvalPoint | None" = None) -> dict:
        row = {"iteration": self.iteration, **{f"eval/{k}": v for k, v in self.means().items()}}
        if self.fid_proxy is not None:
            row["eval/fid_proxy"] = self.fid_proxy
        if self.spread is not None and first is not None and first.spread:
            row["eval/diversity"] = self.spread / first.spread
        return row


def within_class_spread(features: torch.Tensor, class_ids: torch.Tensor) -> float:
    """Mean over classes of the mean squared distance of a class's features to their centroid."""
    spreads = []
    for c in class_ids.unique():
        f = features[class_ids == c].double()
        if len(f) > 1:
            spreads.append((f - f.mean(0)).square().sum(1).mean())
    return float(torch.stack(spreads).mean()) if spreads else float("nan")


class FixedEval:
    def __init__(self, recipe, rewards, class_num: int, device="cpu"):
        s = recipe.train
        classes = [int(c) for c in s.classes] or list(range(class_num))
        self.class_ids = [c for c in classes for _ in range(s.eval_per_class)]
        self.num_workers, self.rewards, self.device = s.num_workers, rewards, device
        self.prompt_template = s.prompt_template
        from marval_rl.data import class_names

        self.embedded = s.eval_real == "auto" and class_num == len(class_names())
        self.classifier = self.fid = None
        if self.embedded:
            from marval_rl.config import asset_path
            from marval_rl.eval.fid import FIDProxy
            from marval_rl.rewards.classifier import load_emoji_classifier

            self.classifier = load_emoji_classifier(None, device)
            self.fid = FIDProxy(self.classifier, asset_path("embedded/fid"))
        self.real: dict[str, float] = {}

    def requests(self, version: int) -> list[RolloutRequest]:
        chunks = [self.class_ids[i::self.num_workers] for i in range(self.num_workers)]
        return [RolloutRequest(version, chunk, seed=EVAL_SEED + i, explore=False) for i, chunk in enumerate(chunks)
                if chunk]

    def _order(self) -> torch.Tensor:
        """Index that puts the workers' interleaved chunks back into ``class_ids`` order."""
        pos = [i for w in range(self.num_workers) for i in range(w, len(self.class_ids), self.num_workers)]
        return torch.argsort(torch.tensor(pos))

    @torch.no_grad()
    def run(self, executor, version: int, iteration: int) -> EvalPoint:
        batches = executor.rollout(self.requests(version))
        order = self._order()
        scores = {k: v[order] for k, v in RewardRecord.cat([b.rewards for b in batches]).per_sample().items()}
        images = torch.cat([b.images for b in batches])[order]
        point = EvalPoint(iteration, scores, images)
        if self.embedded:
            x = images.float().div(255).to(self.device)
            point.fid_proxy = self.fid.score(x)
            point.spread = within_class_spread(self.classifier.features(x), torch.tensor(self.class_ids))
        return point

    @torch.no_grad()
    def score_real(self, size: int) -> dict[str, float]:
        """Mean of every reward on held-out real renders of the eval classes (the embedded default only)."""
        if not self.embedded:
            return {}
        from marval_rl.data import class_names
        from marval_rl.data.emoji import render, split_seed
        from marval_rl.data.prompts import class_prompts

        ids = torch.tensor(self.class_ids)
        images = render(ids, size, split_seed(REAL_SEED, "test"), "light").float().div(255).to(self.device)
        prompts = class_prompts(self.class_ids, class_names(), self.prompt_template)
        record = self.rewards.score_all(images, prompts, {"class_ids": ids.to(self.device)})
        self.real = {k: v.float().mean().item() for k, v in record.per_sample().items()}
        return self.real


def summarise(first: EvalPoint | None, last: EvalPoint | None, real: dict[str, float]) -> dict:
    """The run summary's eval block: per metric key first/last means, std at the start, the real-image
    ceiling, gain in units of the starting spread and the fraction of the gap to real images closed."""
    if first is None:
        return {"eval_first": {}, "eval_last": {}}
    f_mean, f_std = first.means(), first.stds()
    out = {"eval_first": f_mean, "eval_std_first": f_std, "eval_real": {k: real[k] for k in f_mean if k in real},
           "fid_proxy_first": first.fid_proxy}
    if last is None:
        return {**out, "eval_last": {}}
    l_mean = last.means()
    out["eval_last"] = l_mean
    out["eval_gain_sigma"] = {k: (l_mean[k] - f_mean[k]) / f_std[k] if f_std[k] > 0 else None for k in f_mean}
    out["eval_gap_closed"] = {k: (l_mean[k] - f_mean[k]) / (real[k] - f_mean[k])
                              if k in real and real[k] != f_mean[k] else None for k in f_mean}
    out["fid_proxy_last"] = last.fid_proxy
    out["diversity_last"] = last.spread / first.spread if first.spread and last.spread is not None else None
    return out
