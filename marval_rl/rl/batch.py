"""Typed messages between the controller, rollout workers and the trainer (data flows one way)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

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
    """What one worker should generate: one image per class id, all randomness from ``seed``."""
    version: int
    class_ids: list[int]
    seed: int


@dataclass
class RolloutBatch:
    """What a worker returns: tokens, decoded images, rewards and the replay record."""
    version: int                        # policy version the rollouts were sampled with
    worker_id: int
    class_ids: torch.Tensor             # [B]
    prompts: list[str]
    tokens: torch.Tensor                # [B, C, h, w]
    images: torch.Tensor                # [B, 3, H, W] uint8 (for grids and logs)
    rewards: dict[str, torch.Tensor]    # "total" (optimised sum), each component, gold components
    record: SampleRecord                # orders + every draw: replaying it reproduces `tokens`
    old_logprobs: torch.Tensor | None   # [K, B] log pi_old of each AR step's actions (explore_std > 0)
    seconds: dict[str, float] = field(default_factory=dict)   # rollout / reward time on the worker
