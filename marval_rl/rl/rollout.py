"""``RolloutWorker``: samples images from the current policy, decodes and scores them.

The same class runs in-process (tests, ``--no-ray``) and as a Ray actor (``rl/ray_executor.py``). A worker only ever receives versioned weights and rollout requests, and only
returns typed batches: it never sees the trainer.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch

from marval_rl import lora
from marval_rl.acceleration import autocast, compile_generator
from marval_rl.config import LoraSection, ModelSection, RewardSpec, VAESection
from marval_rl.rl.batch import PolicyWeights, RolloutBatch, RolloutRequest, checksum
from marval_rl.rl.policy import GaussianPolicySampler, per_step_sample_mean
from marval_rl.sampling import sample_tokens


class StaleWeightsError(RuntimeError):
    """A request names a policy version the worker does not hold, or weights failed their checksum."""


def class_names_for(num_classes: int) -> list[str]:
    """Entity names of the label space: the 56 emoji classes or the 1000 ImageNet classes."""
    from marval_rl.data import class_names
    from marval_rl.data.prompts import imagenet_class_names

    emoji = class_names()
    if num_classes == len(emoji):
        return emoji
    if num_classes == 1000:
        return imagenet_class_names()
    raise ValueError(f"no class names known for a {num_classes}-class model (56 emoji or 1000 ImageNet "
                     f"classes); give them as train.class_names")


@dataclass
class WorkerSpec:
    """Everything a worker needs to build itself; plain data, so it pickles to Ray actors."""
    model: ModelSection
    vae: VAESection
    rewards: list[RewardSpec]
    gold: list[RewardSpec] = field(default_factory=list)
    num_iter: int = 8
    explore_std: float = 0.0
    explore_steps: list = field(default_factory=list)
    prompt_template: str = "photo"
    class_names: list = field(default_factory=list)
    device: str = "cpu"
    threads: int = 1
    precision: str = "fp32"      # autocast of sampling, decoding and rewards (acceleration.py)
    compile: bool = False        # torch.compile the policy's backbone and head
    compile_mode: str = "default"  # torch.compile's mode (reduce-overhead: CUDA graphs)
    lora: LoraSection = field(default_factory=LoraSection)  # the trainer's adapters, so its weights fit
    seed: int = 0                # train.seed (the adapters' initial A; the trainer's weights replace it)

    @classmethod
    def from_recipe(cls, recipe) -> "WorkerSpec":
        from marval_rl.rl.trainer import explore_std

        s = recipe.train
        return cls(model=recipe.model, vae=recipe.vae, rewards=list(s.rewards), gold=list(s.gold),
                   num_iter=s.num_iter, explore_std=explore_std(s), explore_steps=list(s.explore_steps),
                   prompt_template=s.prompt_template, class_names=list(s.class_names), device=recipe.device,
                   threads=s.worker_threads, precision=recipe.precision, compile=recipe.compile,
                   compile_mode=recipe.compile_mode, lora=s.lora, seed=s.seed)


class RolloutWorker:
    def __init__(self, spec: WorkerSpec, worker_id: int = 0):
        from marval_rl.loading import load_generator, load_vae
        from marval_rl.rl.rewards import RewardSet

        self.spec, self.worker_id = spec, worker_id
        # not frozen: rollouts run under no_grad anyway, and autocast caches its bf16 / fp16 weight casts
        # over the K AR steps of one rollout only for parameters that require grad (frozen, MAR-B's
        # policy re-casts every weight at every step: a bf16 MAR-B generation, batch 2, K = 16, measured
        # 9.7 s frozen against 8.9-9.3 s not frozen)
        self.policy = load_generator(spec.model, spec.device, expected="marval")
        if lora.enabled(spec.lora):   # the same peft layers as the trainer's: its adapter weights load by name
            lora.add_lora(self.policy, spec.lora, "train.lora", seed=spec.seed)
        self.vae = load_vae(spec.vae, spec.device)
        if self.vae is None:
            raise ValueError("rollout workers need vae.checkpoint to decode images")
        self.vae.requires_grad_(False)
        self.rewards = RewardSet(spec.rewards, spec.gold, spec.device, spec.precision)
        if spec.compile:
            compile_generator(self.policy, spec.compile_mode)
        self.names = list(spec.class_names) or class_names_for(self.policy.config.class_num)
        if len(self.names) != self.policy.config.class_num:
            raise ValueError(f"{len(self.names)} class names for a {self.policy.config.class_num}-class policy")
        self.version = -1

    def pid(self) -> int:
        return os.getpid()

    def __repr__(self) -> str:  # Ray shows it in the dashboard's Actors table and in log prefixes
        return f"RolloutWorker(id={self.worker_id}, policy_version={self.version})"

    @contextlib.contextmanager
    def _threads(self):
        """``spec.threads`` torch threads for this worker's work, restored afterwards.

        A Ray actor has its process to itself, but an in-process worker (``LocalExecutor``, ``--no-ray``)
        shares the driver's: setting the count once would make the trainer single-threaded too (other
        numbers than under Ray: a matmul's rounding depends on its thread count)."""
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, self.spec.threads))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def set_weights(self, weights: PolicyWeights) -> int:
        if checksum(weights.state) != weights.checksum:
            raise StaleWeightsError(f"worker {self.worker_id}: weights of version {weights.version} failed "
                                    f"their checksum (corrupted in transit)")
        own = self.policy.state_dict()
        bad = [k for k, v in weights.state.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise StaleWeightsError(f"worker {self.worker_id}: weights do not fit the policy: {bad[:5]}")
        self.policy.load_state_dict(weights.state, strict=False)
        self.version = weights.version
        return self.version

    def rollout(self, request: RolloutRequest) -> RolloutBatch:
        with self._threads(), torch.no_grad(), autocast(self.spec.precision, self.spec.device):
            return self._rollout(request)

    def _rollout(self, request: RolloutRequest) -> RolloutBatch:
        if request.version != self.version:
            raise StaleWeightsError(f"worker {self.worker_id} holds policy version {self.version}, "
                                    f"request is for version {request.version}")
        from marval_rl.data.prompts import class_prompts

        t0 = time.perf_counter()
        labels = torch.tensor(request.class_ids, dtype=torch.int64)
        prompts = class_prompts(request.class_ids, self.names, self.spec.prompt_template)
        g, bsz = torch.Generator().manual_seed(request.seed), len(request.class_ids)
        std = self.spec.explore_std if request.explore else 0.0
        share = request.share_noise and request.group_size > 1
        sampler = GaussianPolicySampler(self.policy.one_step, std, self.spec.explore_steps, request.group_size, share,
                                        bsz=bsz)
        orders = None
        if share:  # one mask order per group
            if bsz % request.group_size:
                raise ValueError(f"{bsz} rollouts do not split into groups of {request.group_size}")
            orders = self.policy.sample_orders(bsz // request.group_size, g).repeat_interleave(request.group_size, 0)
        res = sample_tokens(self.policy, labels=labels, num_iter=self.spec.num_iter, orders=orders,
                            generator=g, token_sampler=sampler)
        images = self.vae.decode_images(res.tokens)
        t1 = time.perf_counter()
        rewards = self.rewards.score_all(images, prompts, {"class_ids": labels.to(images.device)})
        t2 = time.perf_counter()
        old_logprobs = per_step_sample_mean(sampler.logprobs, res.record.predicted).cpu() if std > 0 else None
        return RolloutBatch(version=self.version, worker_id=self.worker_id, class_ids=labels, prompts=prompts,
                            tokens=res.tokens.cpu(), images=(images * 255).round().to(torch.uint8).cpu(),
                            rewards=rewards.to("cpu"), record=res.record, old_logprobs=old_logprobs,
                            explored=std > 0, shared_noise=share,
                            seconds={"rollout": t1 - t0, "reward": t2 - t1})
