"""The checks of a train recipe that need no weights: every bad value of the train section as one
error naming its key, before anything loads (``marval-rl train`` and ``validate`` call them through
``preflight``; ``run_training`` calls them again for API users)."""
from __future__ import annotations

import math
import os

import torch

from marval_rl.config import Recipe, RecipeError
from marval_rl.rl.trainer import explore_std
from marval_rl.rl.update_rules import resolve_update_rule


def check_train_recipe(recipe: Recipe, class_num: int | None = None) -> None:
    """Every problem of the train section as one ValueError naming the key, before anything loads.

    ``class_num``: the policy's number of classes, for the range of ``train.classes`` and the length of
    ``train.class_names``; None reads it from the checkpoint's config when that is readable (no weights
    load). An optional package the recipe asks for (``train.wandb``) that is not installed is an
    ImportError naming the key."""
    from marval_rl.config import check_device, check_optim, check_values

    s = recipe.train
    check_values(recipe)
    check_device(recipe.device, here=False)     # the CLI also checks that this machine has it
    rule = resolve_update_rule(s.algorithm)
    from marval_rl.rewards import resolve_reward_class

    for key, specs in (("train.rewards", s.rewards), ("train.gold", s.gold)):   # names and files, before loading
        for spec in specs:
            try:
                resolve_reward_class(spec.name)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from e
    for key in ("num_workers", "rollouts_per_worker", "iterations", "num_iter", "worker_threads", "group_size",
                "trainer_ranks", "trainer_threads"):
        if getattr(s, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(s, key)}")
    for key in ("eval_per_class", "eval_every", "grid_every", "checkpoint_every"):
        if getattr(s, key) < 0:
            raise ValueError(f"train.{key} must be >= 0 (0 = off), got {getattr(s, key)}")
    check_optim(s.optim, "train.optim", min_steps=0)
    if not s.rewards:
        raise ValueError("train.rewards is empty: name at least one reward to optimise")
    from marval_rl.data.prompts import TEMPLATES

    if s.prompt_template not in TEMPLATES:
        try:
            ok = s.prompt_template.count("{}") == 1 and bool(s.prompt_template.format("x"))
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"train.prompt_template must be one of {sorted(TEMPLATES)} or a format string with "
                             f"exactly one '{{}}' (the class name), got {s.prompt_template!r}")
    bad_names = [n for n in s.class_names if not isinstance(n, str) or not n]
    if bad_names:
        raise ValueError(f"train.class_names must be non-empty strings, got {bad_names[:5]}")
    if not 0 <= s.dashboard_port <= 65535:
        raise ValueError(f"train.dashboard_port must be a TCP port in [0, 65535] (0 = any free port), "
                         f"got {s.dashboard_port}")
    if s.wandb == "False":   # YAML reads an unquoted `off` (or no/false) as a boolean: that means off
        s.wandb = "off"
    if s.wandb not in ("off", "offline", "online"):
        quote = " (YAML reads on/yes/true as a boolean; say offline or online)" if s.wandb == "True" else ""
        raise ValueError(f"train.wandb must be off, offline or online, got {s.wandb!r}{quote}")
    if s.wandb != "off":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ImportError(f"train.wandb={s.wandb} needs wandb, which is not installed: "
                              f"pip install 'marval-rl[wandb]'", name="wandb")
    if class_num is None:
        from marval_rl.loading import generator_config
        from marval_rl.models.checkpoints import CheckpointError

        try:
            class_num = generator_config(recipe.model)[1].class_num
        except (RecipeError, CheckpointError, ValueError, OSError):
            class_num = None    # the loader reports a bad checkpoint with its own message
    if class_num is not None:
        if any(isinstance(c, str) for c in s.classes):   # names ("lion") -> ids, once, for everyone downstream
            from marval_rl.data.prompts import class_ids_from
            from marval_rl.rl.rollout import class_names_for

            s.classes = class_ids_from(s.classes, list(s.class_names) or class_names_for(class_num), "train.classes")
        tokens = _policy_tokens(recipe)
        if tokens is not None and s.num_iter > tokens:
            raise ValueError(f"train.num_iter must be in [1, {tokens}] (the policy's number of tokens), got {s.num_iter}")
        out_of_range = [c for c in s.classes if not 0 <= c < class_num]
        if out_of_range:
            raise ValueError(f"train.classes must be class ids in [0, {class_num}) (the policy's class_num), "
                             f"got {out_of_range}")
        if s.class_names and len(s.class_names) != class_num:
            raise ValueError(f"train.class_names has {len(s.class_names)} names for a {class_num}-class policy "
                             f"(one name per class id, in order)")
    for key in ("reg_weight", "kl_weight", "clip_range", "adv_clip", "reward_norm_momentum"):
        v = float(getattr(s, key))
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"train.{key} must be a finite number >= 0, got {v}")
    if not 0 < s.reward_norm_momentum <= 1:
        raise ValueError(f"train.reward_norm_momentum must be in (0, 1], got {s.reward_norm_momentum}")
    if s.grad_last_k is not None and not 1 <= s.grad_last_k <= s.num_iter:
        raise ValueError(f"train.grad_last_k must be in [1, train.num_iter = {s.num_iter}] (or null = all), "
                         f"got {s.grad_last_k}")
    if s.ppo_epochs < 1:
        raise ValueError(f"train.ppo_epochs must be >= 1, got {s.ppo_epochs}")
    bad_steps = [k for k in s.explore_steps
                 if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k < s.num_iter)]
    if bad_steps:
        raise ValueError(f"train.explore_steps must be AR step indices in [0, {s.num_iter}), got {bad_steps}")
    std = explore_std(s)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"train.explore_std must be a finite number >= 0, got {std}")
    if rule.needs_exploration and std <= 0:
        raise ValueError(f"train.algorithm={s.algorithm} needs train.explore_std > 0 (a deterministic policy "
                         f"has no density), got {std}")
    if rule.needs_groups:
        if s.group_size < 2:
            raise ValueError(f"train.group_size must be >= 2 for train.algorithm={s.algorithm} (advantages are "
                             f"normalised within groups), got {s.group_size}")
        if s.rollouts_per_worker % s.group_size:
            raise ValueError(f"train.rollouts_per_worker ({s.rollouts_per_worker}) must be a multiple of "
                             f"train.group_size ({s.group_size}) for train.algorithm={s.algorithm}")
    from marval_rl.rl.policy import TRAINABLE_GROUPS

    from marval_rl import lora

    lora.check_lora_section(s.lora, "train.lora")
    use_lora = lora.enabled(s.lora)
    bad = [g for g in s.trainable if g not in TRAINABLE_GROUPS]
    if bad or not (s.trainable or use_lora):
        raise ValueError(f"train.trainable must name some of {sorted(TRAINABLE_GROUPS)}"
                         f"{' (or none, with train.lora)' if use_lora else ''}, got {list(s.trainable)}")
    if use_lora:
        if float(s.lora.dropout) != 0:
            raise ValueError(f"train.lora.dropout must be 0 in RL (the policy runs without dropout so that the "
                             f"trainer's replay equals the rollout), got {s.lora.dropout}")
        lora.require_peft("train.lora")
        check_lora_targets(recipe)
    lr_groups = sorted(TRAINABLE_GROUPS) + ["lora"]
    bad_lr = {g: v for g, v in dict(s.group_lr).items()
              if g not in lr_groups or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0}
    if bad_lr:  # a group that does not train is ignored (so overriding train.trainable alone works)
        raise ValueError(f"train.group_lr must map groups of {lr_groups} to finite lrs > 0, got {bad_lr}")
    if s.eval_real not in ("auto", "off"):
        raise ValueError(f"train.eval_real must be 'auto' or 'off', got {s.eval_real!r}")
    cores = os.cpu_count() or 1
    if not s.ray_address and recipe.device == "cpu" and s.num_workers * s.worker_threads > cores:
        raise ValueError(f"train.num_workers x train.worker_threads = {s.num_workers * s.worker_threads} "
                         f"exceeds the {cores} CPU cores of this machine; lower them or join a cluster "
                         f"with train.ray_address")
    check_trainer_ranks(recipe, cores)


def check_lora_targets(recipe: Recipe) -> None:
    """train.lora.targets name Linear layers of the policy, none of them trained fully too (on the policy's
    config only, before anything loads)."""
    from marval_rl import lora
    from marval_rl.loading import generator_config
    from marval_rl.rl.policy import trainable_names

    try:
        cfg = generator_config(recipe.model, expected="marval")[1]
    except Exception:   # the loader reports a bad checkpoint with its own message later
        return
    lora.check_targets(cfg, recipe.train.lora, "train.lora",
                       lambda model: trainable_names(model, recipe.train.trainable, allow_empty=True), "train.trainable")


def check_trainer_ranks(recipe: Recipe, cores: int) -> None:
    """train.trainer_ranks: whole shares of the rollout batches, and (local cluster) this machine's CPUs/GPUs;
    a joined cluster is checked against its resources once joined (``ray_trainers.check_cluster``)."""
    s = recipe.train
    if s.trainer_ranks == 1:
        return
    if s.num_workers % s.trainer_ranks:
        raise ValueError(f"train.num_workers ({s.num_workers}) must be a multiple of train.trainer_ranks "
                         f"({s.trainer_ranks}): each trainer rank updates on an equal share of the iteration's "
                         f"rollout batches")
    if s.ray_address:
        return
    if str(recipe.device).startswith("cuda"):
        gpus = torch.cuda.device_count()
        if s.trainer_ranks > gpus:
            raise ValueError(f"train.trainer_ranks={s.trainer_ranks} exceeds the {gpus} GPUs of this machine "
                             f"(one GPU per trainer rank); lower it or join a cluster with train.ray_address")
    elif s.trainer_ranks * s.trainer_threads > cores:
        raise ValueError(f"train.trainer_ranks={s.trainer_ranks} x train.trainer_threads={s.trainer_threads} = "
                         f"{s.trainer_ranks * s.trainer_threads} exceeds the {cores} CPU cores of this machine; "
                         f"lower them or join a cluster with train.ray_address")


def _policy_tokens(recipe) -> int | None:
    """The policy's token count from its checkpoint config (no weights read), or None if unreadable."""
    from marval_rl.loading import generator_config

    try:
        cfg = generator_config(recipe.model)[1]
        return (cfg.img_size // cfg.vae_stride // cfg.patch_size) ** 2
    except Exception:   # the loader reports a bad checkpoint with its own message later
        return None
