"""``RLTrainer``: holds the policy, its frozen reference and the optimiser; an update rule does the rest.

What trains is named by ``train.trainable`` (parameter groups of :data:`marval_rl.rl.policy.TRAINABLE_GROUPS`:
the one-step head, the class embedding, the rest of the backbone, or all). Whatever trains, the
regulariser compares the policy with the reference *model* on the visited states: when only the head
trains the reference backbone equals the policy's and one backbone pass serves both; otherwise the
frozen reference model computes its own condition z_ref on the same state (``PolicyView``).
``train.lora`` adds peft LoRA adapters (marval_rl/lora.py) that train beside (never on top of) the plain
groups; the reference is then the frozen base: the policy's own frozen tensors with the adapters off.

Update rules (``marval_rl/rl/update_rules.py``, registered by name) use :meth:`sampler`, :meth:`replay`,
:meth:`decode`, :meth:`reward_scale`, :meth:`backward` and :meth:`step`; the trainer applies one rule per iteration and
bumps the policy version.
"""
from __future__ import annotations

import torch

from marval_rl import lora
from marval_rl.acceleration import autocast
from marval_rl.config import TrainSection
from marval_rl.models.one_step import MARVAL
from marval_rl.rl.batch import PolicyWeights, RolloutBatch
from marval_rl.rl.policy import GaussianPolicySampler, PolicyView, trainable_names
from marval_rl.rl.update_rules import resolve_update_rule
from marval_rl.sampling import sample_tokens
from marval_rl.training import EMA, lr_at, make_optimizer, set_lr


def explore_std(section: TrainSection) -> float:
    """Exploration std of the recipe's rollouts: explicit, or 0.1 for rules that need exploration."""
    if section.explore_std is not None:
        return float(section.explore_std)
    return 0.1 if resolve_update_rule(section.algorithm).needs_exploration else 0.0


class RLTrainer:
    def __init__(self, policy: MARVAL, vae, rewards, section: TrainSection, precision: str = "fp32"):
        if not isinstance(policy, MARVAL):
            raise ValueError(f"RL starts from a MARVAL one-step policy, got a {type(policy).__name__} "
                             f"(distill a teacher first: marval-rl distill)")
        self.s, self.vae, self.rewards = section, vae.eval().requires_grad_(False), rewards
        self.rule = resolve_update_rule(section.algorithm)(section)
        self.std = explore_std(section)
        if self.rule.needs_differentiable_rewards:
            rewards.check_differentiable(f"train.algorithm={section.algorithm}")
        self.policy = policy.train(False)  # no dropout: the replay must equal the rollout
        self.policy.config.grad_checkpointing = section.grad_checkpointing
        use_lora = lora.enabled(section.lora)
        plain = trainable_names(policy, section.trainable, allow_empty=use_lora)
        adapters = []
        if use_lora:   # peft adapters on the chosen Linear layers (marval_rl/lora.py)
            lora.check_no_overlap(lora.resolve_targets(policy, section.lora, "train.lora"), plain,
                                  "train.lora", "train.trainable")
            adapters = lora.add_lora(policy, section.lora, "train.lora", seed=section.seed)
        trained = set(plain) | set(adapters)
        self.names = [n for n, _ in policy.named_parameters() if n in trained]
        if not self.names:
            raise ValueError("nothing trains: name train.trainable groups or train.lora.targets")
        # the anchor's reference: the starting model, sharing every frozen tensor with the policy (adapters
        # off, private copies of the fully trained parameters only), so it costs no second model
        self.reference = lora.frozen_base(policy, self.names)
        self.head_only = all(n.startswith("one_step.") for n in self.names)
        self.policy.requires_grad_(False)
        params = dict(policy.named_parameters())
        for n in self.names:
            params[n].requires_grad_(True)
        self.optimizer = make_optimizer(self.policy, section.optim, lr_scale=self._lr_scale)
        if not 0.0 <= section.optim.ema < 1.0:
            raise ValueError(f"train.optim.ema must be in [0, 1) (0 = off), got {section.optim.ema}")
        # EMA of the trained parameters (train.optim.ema > 0): what the fixed eval scores and what is saved
        self.ema = EMA(policy, section.optim.ema, names=self.names) if section.optim.ema > 0 else None
        self.version = 0
        self.reward_std: float | None = None   # running per-sample std of the optimised reward
        # precision: the replays and decodes run under the rollouts' autocast (same kernels, so on-policy
        # replays stay exact); fp16 also scales the loss so small gradients do not flush to zero
        self.precision = precision
        # compiled rollouts (``compile=true``) against eager replays agree only up to rounding: then the
        # on-policy ratio is 1 +- rounding, reported (pg/ratio_first_epoch_max_dev) but not asserted
        self.exact_replay = True
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def _lr_scale(self, name: str) -> float:
        """train.group_lr / train.optim.lr for the first group in train.group_lr that holds ``name``
        (``lora``: the adapters; the plain groups: the fully trained parameters)."""
        from marval_rl.rl.policy import TRAINABLE_GROUPS

        is_adapter = ".lora_A." in name or ".lora_B." in name
        for group, lr in dict(self.s.group_lr).items():
            if (group == "lora" and is_adapter) or (group != "lora" and not is_adapter and TRAINABLE_GROUPS[group](name)):
                return float(lr) / self.s.optim.lr
        return 1.0

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def weights(self, averaged: bool = False) -> PolicyWeights:
        """The trained parameters at this version (their EMA with ``averaged`` when train.optim.ema > 0)."""
        if averaged and self.ema is not None:
            return PolicyWeights.of(self.version, self.ema.shadow)
        params = dict(self.policy.named_parameters())
        return PolicyWeights.of(self.version, {n: params[n] for n in self.names})

    def final_policy(self) -> MARVAL:
        """The policy to save: the live weights, or a copy carrying their EMA (with its LoRA adapters, if
        any: the controller saves them and merges them, ``lora.merged_copy``)."""
        return self.policy if self.ema is None else self.ema.averaged_copy(self.policy)

    # ------------------------------------------------------------------ tools of the update rules
    def sampler(self, batch: RolloutBatch, actions=None, with_reference: bool = False) -> GaussianPolicySampler:
        """The rollout's own sampler (same std, exploring steps and noise sharing), for a replay."""
        s = self.s
        sampler = GaussianPolicySampler(self.policy.one_step, self.std if batch.explored else 0.0,
                                        s.explore_steps, s.group_size, batch.shared_noise, actions,
                                        self.reference.one_step if with_reference else None, len(batch.class_ids))
        return sampler

    def replay(self, batch: RolloutBatch, sampler, grad_last_k: int | None = None):
        """Recompute a rollout from its record with autograd on (reference model beside when needed)."""
        needs_ref_model = sampler.reference_head is not None and not self.head_only
        view = PolicyView(self.policy, self.reference if needs_ref_model else None, self.s.detach_context)
        with autocast(self.precision, self.device):
            return sample_tokens(view, replay=batch.record, token_sampler=sampler, grad_last_k=grad_last_k)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            return self.vae.decode_images(tokens)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate an update rule's loss (outside autocast; scaled under fp16). A non-finite loss stops
        the run here, before any weight or checkpoint takes it in."""
        from marval_rl.distributed import all_true

        if not all_true(bool(torch.isfinite(loss.detach()).all())):   # trainer ranks decide together
            raise FloatingPointError(f"train.algorithm={self.s.algorithm}: the update rule's loss is "
                                     f"{loss.detach().flatten()[0].item()} at policy version {self.version}; "
                                     f"nothing of this update was applied or saved (lower the lr, or check the rule)")
        self.scaler.scale(loss).backward()

    def reward_scale(self, totals: torch.Tensor) -> float:
        """Running per-sample std of the optimised reward (1.0 when ``normalize_reward`` is off)."""
        if not self.s.normalize_reward:
            return 1.0
        from marval_rl.distributed import all_cat

        totals = all_cat(totals)   # with several trainer ranks: one scale, over the global batch, on every rank
        std = float(totals.float().std()) if totals.numel() > 1 else 0.0
        m = self.s.reward_norm_momentum
        self.reward_std = std if self.reward_std is None else (1 - m) * self.reward_std + m * std
        return max(self.reward_std, 1e-8)

    def step(self) -> float:
        """Average gradients across trainer ranks, clip, optimiser step; returns the pre-clip norm."""
        from marval_rl.distributed import average_gradients, check_in_sync

        clip = self.s.optim.grad_clip
        params = [p for p in self.policy.parameters() if p.requires_grad]
        average_gradients(params)  # no-op in a single process
        params = [p for p in params if p.grad is not None]
        self.scaler.unscale_(self.optimizer)  # fp16: clip the true gradients (a no-op otherwise)
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")) if params else torch.zeros(())
        set_lr(self.optimizer, lr_at(self.version, self.s.optim))  # train.optim.warmup_steps: linear warm-up
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        bad = [n for n, p in self.policy.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:   # NaN gradients that the clip passed on (fp16's scaler skips those steps itself)
            raise FloatingPointError(f"train.algorithm={self.s.algorithm}: the update made {len(bad)} trained "
                                     f"tensor(s) non-finite ({bad[0]}, ...) at policy version {self.version} "
                                     f"(gradient norm {float(norm)}); nothing of it was saved")
        if self.ema is not None:
            self.ema.update(self.policy)
        check_in_sync(self.policy)
        return float(norm)

    # ------------------------------------------------------------------------------ one update
    def update(self, batches: list[RolloutBatch]) -> dict:
        """One policy update from this iteration's rollouts; returns metrics and bumps the version."""
        lag = max(self.version - b.version for b in batches)
        if self.rule.needs_exploration and any(b.old_logprobs is None for b in batches):
            raise ValueError(f"train.algorithm={self.s.algorithm} needs rollouts sampled with explore_std > 0")
        stats = self.rule.update(self, batches)
        self.version += 1
        return {**stats, "version_lag": lag}

    def state_dict(self) -> dict:
        params = dict(self.policy.named_parameters())
        return {"trainable": {n: params[n].detach().clone() for n in self.names},
                "optimizer": self.optimizer.state_dict(), "version": self.version, "ema": self.ema.state_dict() if self.ema is not None else {},
                "reward_std": -1.0 if self.reward_std is None else self.reward_std,
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {})}

    def load_state_dict(self, state: dict):
        from marval_rl.models.checkpoints import CheckpointError

        params = dict(self.policy.named_parameters())
        got = state["trainable"]
        missing, unexpected = sorted(set(self.names) - set(got)), sorted(set(got) - set(self.names))
        bad = [n for n in self.names if n in got and got[n].shape != params[n].shape]
        if missing or unexpected or bad:
            raise CheckpointError(f"RL state does not fit this policy / train.trainable: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}, shape mismatches {bad[:5]}")
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(got[n])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if set(state.get("ema", {})) != set(self.names):
                raise CheckpointError("RL state has no EMA of the trained parameters, but train.optim.ema > 0")
            self.ema.load_state_dict(state["ema"])
        self.version = int(state["version"])
        if self.scaler.is_enabled() and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        rs = float(state.get("reward_std", -1.0))
        self.reward_std = None if rs < 0 else rs
