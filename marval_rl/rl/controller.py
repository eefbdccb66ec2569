"""The single controller of ``marval-rl train``: weights out, rollouts in, one update per iteration.

    for each iteration:
        trainer.weights() --(version v, checksum)--> every RolloutWorker
        RolloutRequest(v, class ids, seed) ---------> workers --> RolloutBatch (tokens, images,
                                                                   rewards, replay record, log-probs)
        trainer.update(batches)  -> version v + 1, metrics, checkpoints

Executors hide where workers live: ``LocalExecutor`` (this process; tests, ``--no-ray``) or
``RayExecutor`` (Ray actors, ``rl/ray_executor.py``; the only module that imports Ray).
All randomness is derived from (train.seed, iteration, request index), and the controller's state
(trainer weights, optimiser, version, iteration, metrics history) is checkpointed atomically, so a
killed run resumes to the same numbers.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from marval_rl.config import Recipe
from marval_rl.models.checkpoints import atomic_write, save_pretrained, torch_load_safely
from marval_rl.rl.batch import PolicyWeights, RolloutBatch, RolloutRequest
from marval_rl.rl.rollout import RolloutWorker, WorkerSpec
from marval_rl.rl.trainer import RLTrainer, explore_std


class LocalExecutor:
    """Rollout workers as plain objects in this process."""

    def __init__(self, spec: WorkerSpec, num_workers: int):
        self.workers = [RolloutWorker(spec, i) for i in range(num_workers)]

    def set_weights(self, weights: PolicyWeights):
        for w in self.workers:
            w.set_weights(weights)

    def rollout(self, requests: list[RolloutRequest]) -> list[RolloutBatch]:
        return [w.rollout(r) for w, r in zip(self.workers, requests)]

    def shutdown(self):
        pass


def make_requests(recipe: Recipe, version: int, iteration: int, num_classes: int,
                  rank: int = 0) -> list[RolloutRequest]:
    """Class ids and seeds for each worker; groups of G identical prompts for policy gradient."""
    s = recipe.train
    g = torch.Generator().manual_seed((s.seed * 1_000_003 + iteration) * 1009 + rank)
    classes = torch.tensor([int(c) for c in s.classes] or list(range(num_classes)))
    group = s.group_size if s.algorithm == "policy_gradient" else 1
    out = []
    for w in range(s.num_workers):
        picks = classes[torch.randint(0, len(classes), (s.rollouts_per_worker // group,), generator=g)]
        out.append(RolloutRequest(version=version, class_ids=picks.repeat_interleave(group).tolist(),
                                  seed=int(torch.randint(0, 2 ** 31 - 1, (), generator=g))))
    return out


def evaluate_policy(executor, weights: PolicyWeights, recipe: Recipe, num_classes: int) -> dict:
    """Mean rewards on a fixed prompt set (every class x eval_per_class, fixed seed), split over workers."""
    s = recipe.train
    classes = [int(c) for c in s.classes] or list(range(num_classes))
    ids = [c for c in classes for _ in range(s.eval_per_class)]
    chunks = [ids[i::s.num_workers] for i in range(s.num_workers)]
    requests = [RolloutRequest(weights.version, chunk, seed=10_007 + i) for i, chunk in enumerate(chunks) if chunk]
    batches = executor.rollout(requests)
    return {f"eval/{k}": torch.cat([b.rewards[k] for b in batches]).mean().item() for k in batches[0].rewards}


def check_train_recipe(recipe: Recipe) -> None:
    s = recipe.train
    if s.algorithm not in ("reward_gradient", "policy_gradient"):
        raise ValueError(f"train.algorithm must be reward_gradient or policy_gradient, got {s.algorithm!r}")
    if s.num_workers < 1 or s.rollouts_per_worker < 1 or s.iterations < 1:
        raise ValueError("train.num_workers, train.rollouts_per_worker and train.iterations must be >= 1")
    if s.algorithm == "policy_gradient" and s.rollouts_per_worker % s.group_size:
        raise ValueError(f"train.rollouts_per_worker ({s.rollouts_per_worker}) must be a multiple of "
                         f"train.group_size ({s.group_size}) for policy gradient")
    cores = os.cpu_count() or 1
    if not s.ray_address and recipe.device == "cpu" and s.num_workers * s.worker_threads > cores:
        raise ValueError(f"train.num_workers x train.worker_threads = {s.num_workers * s.worker_threads} "
                         f"exceeds the {cores} CPU cores of this machine; lower them or join a cluster "
                         f"with train.ray_address")


def summarise(history: list[dict], keys: list[str]) -> list[dict]:
    rows = []
    for k in keys:
        vals = [h[k] for h in history if k in h]
        if vals:
            rows.append({"metric": k, "first": vals[0], "last": vals[-1], "best": max(vals)})
    return rows


def run_training(recipe: Recipe, use_ray: bool | None = None, progress: bool = True,
                 stop_after: int | None = None) -> dict:
    """Run (or resume) RL; returns the summary. ``stop_after`` ends early (tests of resume)."""
    from marval_rl.loading import load_generator, load_vae
    from marval_rl.rl.logging import RunLogger
    from marval_rl.rl.rewards import RewardSet

    from marval_rl.rl.distributed import all_mean, finish, world

    check_train_recipe(recipe)
    rank, world_size = world()
    s, out = recipe.train, Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    policy = load_generator(recipe.model, recipe.device, expected="marval")
    vae = load_vae(recipe.vae, recipe.device)
    if vae is None:
        raise ValueError("train needs vae.checkpoint to decode images")
    trainer = RLTrainer(policy, vae, RewardSet(s.rewards, s.gold, recipe.device), s)
    spec = WorkerSpec(model=recipe.model, vae=recipe.vae, rewards=list(s.rewards), gold=list(s.gold),
                      num_iter=s.num_iter, explore_std=explore_std(s), prompt_template=s.prompt_template,
                      class_names=list(s.class_names),
                      device=recipe.device, threads=s.worker_threads)
    state_path = out / "rl_state.pt"
    history: list[dict] = []
    start, eval_resumed = 0, {}
    if state_path.is_file():
        state = torch_load_safely(state_path)
        trainer.load_state_dict(state["trainer"])
        history, start = json.loads(state["history"]), int(state["iteration"])
        eval_resumed = json.loads(state.get("eval_first", "{}"))
        print(f"[train] resuming at iteration {start} ({state_path})")
    use_ray = s.use_ray if use_ray is None else use_ray
    if use_ray:
        from marval_rl.rl.ray_executor import RayExecutor

        executor = RayExecutor(spec, s.num_workers, s)
    else:
        executor = LocalExecutor(spec, s.num_workers)
    logger = RunLogger(out, recipe, resume=start > 0) if rank == 0 else None
    t_run = time.perf_counter()
    eval_first, eval_last = (eval_resumed if start else {}), {}
    try:
        end = s.iterations if stop_after is None else min(s.iterations, stop_after)
        if s.eval_per_class and start == 0 and rank == 0:
            executor.set_weights(trainer.weights())
            eval_first = evaluate_policy(executor, trainer.weights(), recipe, policy.config.class_num)
        for it in tqdm(range(start, end), initial=start, total=s.iterations, desc="RL", disable=not progress):
            t0 = time.perf_counter()
            executor.set_weights(trainer.weights())
            t1 = time.perf_counter()
            batches = executor.rollout(make_requests(recipe, trainer.version, it, policy.config.class_num, rank))
            t2 = time.perf_counter()
            stats = trainer.update(batches)
            t3 = time.perf_counter()
            n = sum(len(b.class_ids) for b in batches)
            metrics = {"iteration": it + 1, "version": trainer.version,
                       **{f"{k}" if k.startswith(("gold/", "reward/")) else f"reward/{k}":
                          torch.cat([b.rewards[k] for b in batches]).mean().item() for k in batches[0].rewards},
                       "time/sync": t1 - t0, "time/rollout": t2 - t1, "time/update": t3 - t2,
                       "time/worker_rollout": max(b.seconds["rollout"] for b in batches),
                       "time/worker_reward": max(b.seconds["reward"] for b in batches),
                       "rollouts_per_s": n / (t2 - t1), **stats}
            if world_size > 1:  # rewards averaged over every rank's rollouts
                metrics = {k: all_mean(v) if k.startswith(("reward/", "gold/")) else v for k, v in metrics.items()}
                metrics["world_size"] = world_size
            history.append(metrics)
            if hasattr(executor, "report"):
                executor.report(metrics)
            if rank != 0:
                continue
            logger.log(metrics, batches if s.grid_every and (it + 1) % s.grid_every == 0 else None)
            if (s.checkpoint_every and (it + 1) % s.checkpoint_every == 0) or it + 1 == end:
                state = {"trainer": trainer.state_dict(), "iteration": it + 1, "history": json.dumps(history),
                         "eval_first": json.dumps(eval_first)}
                atomic_write(state_path, lambda p: torch.save(state, p))
        if s.eval_per_class and rank == 0 and end == s.iterations:
            executor.set_weights(trainer.weights())
            eval_last = evaluate_policy(executor, trainer.weights(), recipe, policy.config.class_num)
    finally:
        executor.shutdown()
    if rank != 0:
        finish()
        return {"rank": rank}
    policy_dir = save_pretrained(trainer.policy, out / "policy",
                                 metadata={"stage": "rl", "algorithm": s.algorithm, "version": trainer.version})
    keys = ["reward/total"] + [k for k in history[-1] if k.startswith(("reward/", "gold/")) and k != "reward/total"] \
        if history else []
    summary = {"algorithm": s.algorithm, "iterations": len(history),
               "optimised_first": history[0]["reward/total"] if history else None,
               "optimised_last": history[-1]["reward/total"] if history else None,
               "gold_first": {k: v for k, v in history[0].items() if k.startswith("gold/")} if history else {},
               "gold_last": {k: v for k, v in history[-1].items() if k.startswith("gold/")} if history else {},
               "eval_first": eval_first, "eval_last": eval_last,
               "wall_seconds": round(time.perf_counter() - t_run, 2), "output_dir": str(out),
               "policy": str(policy_dir)}
    rows = summarise(history, keys) + [{"metric": k, "first": eval_first[k], "last": eval_last[k],
                                        "best": max(eval_first[k], eval_last[k])}
                                       for k in eval_first if k in eval_last]
    logger.finish(history, rows, summary)
    finish()
    return summary
