"""Typed messages between the controller, rollout workers and the trainer (data flows one way)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from marval_rl.rl.rewards import RewardRecord
from marval_rl.sampling import SampleRecord


@dataclass
class PolicyWeights:
    """The trainable part of the policy at one version, with a checksum the workers verify."""
    version: int
    state: dict[str, torch.Tensor]
    checksum: str

    @classmethod
    def of(cls, version: int, state: dict[str, torch.Tensor]) -> "PolicyWeights":
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        return cls(version, state, checksum(state))


def checksum(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class RolloutRequest:
    """What one worker should generate: one image per class id, all randomness from ``seed``.

    ``group_size`` > 1: the class ids come in groups of identical prompts; with ``share_noise`` a group
    shares its mask order and head noise. ``explore=False`` samples the deterministic policy (evaluation)."""
    version: int
    class_ids: list[int]
    seed: int
    group_size: int = 1
    share_noise: bool = False
    explore: bool = True


@dataclass
class RolloutBatch:
    """What a worker returns: tokens, decoded images, rewards and the replay record."""
    version: int                        # policy version the rollouts were sampled with
    worker_id: int
    class_ids: torch.Tensor             # [B]
    prompts: list[str]
    tokens: torch.Tensor                # [B, C, h, w]
    images: torch.Tensor                # [B, 3, H, W] uint8 (for grids and logs)
    rewards: RewardRecord               # optimised total, its parts, gold rewards (per sample)
    record: SampleRecord                # orders + every draw: replaying it reproduces `tokens`
    old_logprobs: torch.Tensor | None   # [K, B] per-dim-mean log pi_old of each AR step's action (0 where
                                        # a step does not explore); None without exploration
    explored: bool = False              # sampled with explore_std > 0
    shared_noise: bool = False          # group members shared mask order and head noise
    seconds: dict[str, float] = field(default_factory=dict)   # rollout / reward time on the worker
