"""The single controller of ``marval-rl train``: weights out, rollouts in, one update per iteration.

    judge = FixedEval(...); first = judge.run(...)          # fixed prompts and seeds, deterministic policy
    for each iteration:
        executor.set_weights(trainer.weights())               # version v, checksum, once per iteration
        batches = executor.rollout(make_requests(...))        # RolloutBatch: tokens, images, RewardRecord,
                                                              #   replay record, log-probs, version
        stats = trainer.update(batches)                       # the update rule -> version v + 1
        log; every eval_every: judge.run; every checkpoint_every: atomic state
    last = judge.run(...); summary, before/after image, policy

Executors hide where workers live: ``LocalExecutor`` (this process; tests, ``--no-ray``) or
``RayExecutor`` (Ray actors, ``rl/ray_executor.py``). The trainer is an ``RLTrainer`` in this process,
or with ``train.trainer_ranks`` > 1 a ``TrainerGroup`` of data-parallel ranks as Ray actors
(``rl/ray_trainers.py``) that the controller drives the same way; Ray is imported only by ``rl/ray_*.py``.
All randomness is derived from (train.seed, iteration, request index), and the controller's state
(trainer weights, optimiser, version, iteration, reward normaliser, metrics and eval history, the
first evaluation) is checkpointed atomically, so a killed run resumes to the same numbers.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from marval_rl import lora, strict_json
from marval_rl.config import Recipe, RecipeError
from marval_rl.models.checkpoints import atomic_write, remove_stale_temps, save_pretrained, torch_load_safely
from marval_rl.rl.batch import PolicyWeights, RolloutBatch, RolloutRequest
from marval_rl.rl.evaluation import EvalPoint, FixedEval, summarise
from marval_rl.rl.rewards import RewardRecord
from marval_rl.rl.rollout import RolloutWorker, WorkerSpec
from marval_rl.rl.recipe_checks import check_train_recipe
from marval_rl.rl.trainer import RLTrainer
from marval_rl.rl.update_rules import resolve_update_rule
from marval_rl.run_record import check_resume, has_state, resume_source, write_run_record


class Executor(Protocol):
    """Where rollout workers live. ``rollout`` returns one batch per request, in request order."""

    def set_weights(self, weights: PolicyWeights) -> None: ...

    def rollout(self, requests: list[RolloutRequest]) -> list[RolloutBatch]: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Rollout workers as plain objects in this process."""

    def __init__(self, spec: WorkerSpec, num_workers: int):
        # (each worker runs its rollouts on spec.threads threads and gives the driver's count back)
        self.workers = [RolloutWorker(spec, i) for i in range(num_workers)]

    def set_weights(self, weights: PolicyWeights):
        for w in self.workers:
            w.set_weights(weights)

    def rollout(self, requests: list[RolloutRequest]) -> list[RolloutBatch]:
        return [self.workers[i % len(self.workers)].rollout(r) for i, r in enumerate(requests)]

    def shutdown(self):
        pass


def make_requests(recipe: Recipe, version: int, iteration: int, num_classes: int,
                  rank: int = 0) -> list[RolloutRequest]:
    """Class ids and seeds for each worker; groups of G identical prompts when the rule needs groups."""
    s = recipe.train
    g = torch.Generator().manual_seed((s.seed * 1_000_003 + iteration) * 1009 + rank)
    classes = torch.tensor([int(c) for c in s.classes] or list(range(num_classes)))
    group = s.group_size if resolve_update_rule(s.algorithm).needs_groups else 1
    out = []
    for w in range(s.num_workers):
        picks = classes[torch.randint(0, len(classes), (s.rollouts_per_worker // group,), generator=g)]
        out.append(RolloutRequest(version=version, class_ids=picks.repeat_interleave(group).tolist(),
                                  seed=int(torch.randint(0, 2 ** 31 - 1, (), generator=g)),
                                  group_size=group, share_noise=s.share_noise and group > 1))
    return out


def summarise_history(history: list[dict], keys: list[str]) -> list[dict]:
    rows = []
    for k in keys:
        vals = [h[k] for h in history if k in h]
        if vals:
            rows.append({"metric": k, "first": vals[0], "last": vals[-1], "best": max(vals)})
    return rows


def _point_state(p: EvalPoint | None) -> dict:
    return {} if p is None else dataclasses.asdict(p)


def _point_from_state(d: dict) -> EvalPoint | None:
    return EvalPoint(**d) if d else None


def build_trainer(recipe: Recipe) -> RLTrainer:
    """The recipe's policy, VAE, rewards and ``RLTrainer`` (the controller's, or one trainer rank's)."""
    from marval_rl.loading import load_generator, load_vae
    from marval_rl.rl.rewards import RewardSet

    torch.manual_seed(recipe.train.seed)
    policy = load_generator(recipe.model, recipe.device, expected="marval")
    vae = load_vae(recipe.vae, recipe.device)
    if vae is None:
        raise ValueError("train needs vae.checkpoint to decode images")
    rewards = RewardSet(recipe.train.rewards, recipe.train.gold, recipe.device, recipe.precision)
    trainer = RLTrainer(policy, vae, rewards, recipe.train, recipe.precision)
    trainer.exact_replay = not recipe.compile
    return trainer


def run_training(recipe: Recipe, use_ray: bool | None = None, progress: bool = True,
                 stop_after: int | None = None, resume_from: str | Path | None = None) -> dict:
    """Run (or resume) RL; returns the summary. ``resume_from``: a state (``rl_state.pt`` or a run's
    folder) to continue into ``output_dir``; default: the one in ``output_dir`` if any. ``stop_after``
    ends early (tests of resume)."""
    from marval_rl.distributed import all_mean, finish, world
    from marval_rl.rl.run_logger import RunLogger
    from marval_rl.rl.rewards import RewardSet

    check_train_recipe(recipe)
    rank, world_size = world(recipe.device)
    s, out = recipe.train, Path(recipe.output_dir)
    use_ray = s.use_ray if use_ray is None else use_ray
    group = s.trainer_ranks > 1     # trainer ranks as Ray actors (rl/ray_trainers.py)
    if group and not use_ray:
        raise ValueError(f"train.trainer_ranks={s.trainer_ranks} runs the trainer ranks as Ray actors and needs Ray "
                         f"(drop --no-ray / train.use_ray=false), or set train.trainer_ranks=1")
    if group and world_size > 1:
        raise ValueError(f"train.trainer_ranks={s.trainer_ranks} under torchrun ({world_size} processes): use one "
                         f"of them to run several trainer ranks, not both")
    if rank == 0:
        remove_stale_temps(out)
    source = resume_source(resume_from, "train") if resume_from is not None else None
    if rank == 0:  # another recipe's state: stop, naming what differs
        if source is not None and has_state(out, "train") and has_state(out, "train").resolve() != source.resolve():
            raise RecipeError(f"--resume {resume_from}: output_dir {out} holds a run of its own; use another "
                              f"output_dir or --overwrite")
        check_resume(out, recipe, "train", source)
    job_name = f"marval-rl train: {out.resolve().name}"
    if group:   # the controller holds no replica: the config for class ids and sizes, rewards for the judge
        from marval_rl.loading import generator_config
        from marval_rl.rl.ray_trainers import TrainerGroup, needs, start_cluster

        policy_config = generator_config(recipe.model)[1]
        torch.manual_seed(s.seed)
        rewards = RewardSet(s.rewards, s.gold, recipe.device, recipe.precision) if s.eval_per_class else None
        # one cluster for trainer ranks and rollout workers; the group stops it (also when it fails to start)
        trainer = TrainerGroup(recipe, owns_ray=start_cluster(recipe, job_name))
    else:
        trainer = build_trainer(recipe)
        policy_config, rewards = trainer.policy.config, trainer.rewards
    class_num = policy_config.class_num
    state_path = out / "rl_state.pt"
    history: list[dict] = []
    start, first, wandb_id = 0, None, None
    load_from = source or (state_path if state_path.is_file() else None)
    if load_from is not None:
        state = torch_load_safely(load_from)
        try:
            trainer.load_state_dict(state["trainer"])   # into every trainer rank
        except BaseException:
            if group:
                trainer.shutdown()
            raise
        history, start = json.loads(state["history"]), int(state["iteration"])
        first = _point_from_state(state.get("eval_first", {}))
        wandb_id = state.get("wandb_id") or None
        print(f"[train] resuming at iteration {start} ({load_from})")
    spec = WorkerSpec.from_recipe(recipe)
    if use_ray:
        from marval_rl.rl.ray_executor import RayExecutor

        try:
            executor = RayExecutor(spec, s.num_workers, s, job_name=job_name,
                                   reserved_gpus=needs(recipe)[2] if group else 0)
        except BaseException:
            if group:
                trainer.shutdown()
            raise
    else:
        executor = LocalExecutor(spec, s.num_workers)
    judge = FixedEval(recipe, rewards, class_num, recipe.device) if s.eval_per_class and rank == 0 else None
    created = rank == 0 and not out.exists()
    if rank == 0:  # only now, with everything loaded and started: a failing start leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        write_run_record(out, recipe, "train")
        if use_ray:  # the custom gauges, graphed offline with a plain Prometheus (docs/ray.md)
            from marval_rl.rl.ray_executor import write_prometheus_config

            write_prometheus_config(out)
    from marval_rl.rl.rollout import class_names_for

    names = list(s.class_names) or class_names_for(class_num)
    logger = RunLogger(out, recipe, names, history, wandb_id=wandb_id) if rank == 0 else None
    t_run = time.perf_counter()
    last, real = None, {}
    end = s.iterations if stop_after is None else min(s.iterations, stop_after)

    def save_state(iteration: int):
        state = {"trainer": trainer.state_dict(), "iteration": iteration, "history": strict_json.dumps(history),
                 "eval_first": _point_state(first), "wandb_id": logger.wandb_id or ""}
        atomic_write(state_path, lambda p: torch.save(state, p))
        logger.report()

    try:
        if judge is not None:
            real = judge.score_real(policy_config.img_size)
            logger.eval_real(real)
            if first is None:
                executor.set_weights(trainer.weights(averaged=True))
                first = judge.run(executor, trainer.version, 0)
            logger.eval_point(first, judge.class_ids)
        bar = tqdm(range(start, end), initial=start, total=s.iterations, desc="RL", disable=not progress)
        for it in bar:
            t0 = time.perf_counter()
            executor.set_weights(trainer.weights())
            t1 = time.perf_counter()
            batches = executor.rollout(make_requests(recipe, trainer.version, it, class_num, rank))
            t2 = time.perf_counter()
            stats = trainer.update(batches)
            t3 = time.perf_counter()
            n = sum(len(b.class_ids) for b in batches)
            metrics = {"iteration": it + 1, "version": trainer.version,
                       **RewardRecord.cat([b.rewards for b in batches]).means(),
                       "time/sync": t1 - t0, "time/rollout": t2 - t1, "time/update": t3 - t2,
                       "time/worker_rollout": max(b.seconds["rollout"] for b in batches),
                       "time/worker_reward": max(b.seconds["reward"] for b in batches),
                       "rollouts_per_s": n / (t2 - t1), **stats}
            if world_size > 1:  # rewards averaged over every rank's rollouts
                metrics = {k: all_mean(v) if k.startswith(("reward/", "gold/")) else v for k, v in metrics.items()}
                metrics["world_size"] = world_size
            if group:
                metrics["trainer_ranks"] = s.trainer_ranks
            if judge is not None and s.eval_every and (it + 1) % s.eval_every == 0 and it + 1 < s.iterations:
                executor.set_weights(trainer.weights(averaged=True))
                point = judge.run(executor, trainer.version, it + 1)
                logger.eval_point(point, judge.class_ids)
                metrics.update(point.log_row(first))
            history.append(metrics)
            if hasattr(executor, "report"):
                executor.report(metrics)
            bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in metrics
                             if k == "reward/total" or k.startswith("gold/")}, refresh=False)
            if rank != 0:
                continue
            # rollout grids every grid_every iterations, and always at the last one (a short run too)
            grid = (s.grid_every and (it + 1) % s.grid_every == 0) or it + 1 == end
            logger.log(metrics, batches if grid else None)
            if (s.checkpoint_every and (it + 1) % s.checkpoint_every == 0) or it + 1 == end:
                save_state(it + 1)
        if judge is not None and end == s.iterations:
            executor.set_weights(trainer.weights(averaged=True))
            last = judge.run(executor, trainer.version, end)
            logger.eval_point(last, judge.class_ids)
        final_policy = trainer.final_policy() if rank == 0 else None   # (before the trainer ranks stop)
    except BaseException:
        # a run that fails before its first checkpoint (a NaN reward at iteration 1) leaves no folder it made
        if created and not state_path.is_file():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        executor.shutdown()
        if group:   # last: it stops the cluster when it started it
            trainer.shutdown()
    if rank != 0:
        finish()
        return {"rank": rank}
    if lora.has_adapters(final_policy):   # the adapter in peft's format, and the policy merged: a plain checkpoint
        lora.save_adapter(final_policy, s.lora, out / "adapter", s.trainable)
        final_policy = lora.merged_copy(final_policy)
    policy_dir = save_pretrained(final_policy, out / "policy",
                                 metadata={"stage": "rl", "algorithm": s.algorithm, "version": trainer.version})
    keys = ["reward/total"] + [k for k in history[-1] if k.startswith(("reward/", "gold/")) and k != "reward/total"] \
        if history else []
    summary = {"algorithm": s.algorithm, "iterations": len(history),
               "optimised_first": history[0]["reward/total"] if history else None,
               "optimised_last": history[-1]["reward/total"] if history else None,
               "gold_first": {k: v for k, v in history[0].items() if k.startswith("gold/")} if history else {},
               "gold_last": {k: v for k, v in history[-1].items() if k.startswith("gold/")} if history else {},
               **summarise(first, last, real),
               "eval_history": ([first.log_row(first)] if first else []) +
                               [{k: v for k, v in h.items() if k == "iteration" or k.startswith("eval/")}
                                for h in history if any(k.startswith("eval/") for k in h)] +
                               ([last.log_row(first)] if last else []),
               "wall_seconds": round(time.perf_counter() - t_run, 2), "output_dir": str(out),
               "policy": str(policy_dir)}
    if last is not None:
        summary["before_after"] = str(logger.before_after(first, last, [names[c] for c in judge.class_ids]))
    # the table a person reads: the fixed eval set (before -> after) when there is one; single rollout
    # batches (noisy) only when the run has no fixed eval
    logger.finish(history, summarise_history(history, keys) if last is None else None, summary, first, last, real)
    finish()
    return summary
