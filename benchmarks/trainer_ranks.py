"""Update time of ``marval-rl train`` with 1 vs 2 trainer ranks (``train.trainer_ranks``) at a fixed global batch.

    python benchmarks/trainer_ranks.py                              # tiny test policy, K=16, 2 x 16 images
    python benchmarks/trainer_ranks.py --set train.num_iter=8 train.rollouts_per_worker=8 --rounds 6
    python benchmarks/trainer_ranks.py --recipe recipes/quickstart.yaml

The rollouts of every round are made once, in this process (``LocalExecutor``), before anything is timed;
each row then applies the same rounds of updates to a fresh trainer: ``in-process`` (an ``RLTrainer`` in
this process, as ``trainer_ranks: 1``), ``ranks xN`` (a ``TrainerGroup`` of N Ray actors, gloo, each
updating on 1/N of the global batch). One warm-up update is not timed. Columns: ``update s`` is what the
controller logs as time/update (sending the shares to the ranks, the update, the metrics back);
``rank s`` is the time inside the ranks (replay, backward, all-reduce, step; max over ranks). The ratio
is bounded by the free cores: on a shared box, look at the load average printed first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def tiny_recipe(tmp: Path, overrides: list[str]):
    from marval_rl.config import load_recipe
    from rl_throughput import NAMES, tiny_spec

    spec, _ = tiny_spec(tmp, 16)
    reward = ROOT / "tests" / "fixtures" / "user_rewards" / "brightness.py"
    return load_recipe(None, [
        f"model.checkpoint={spec.model.checkpoint}", f"vae.checkpoint={spec.vae.checkpoint}",
        f"output_dir={tmp / 'out'}", f"train.rewards=[{{name: '{reward}:Brightness'}}]",
        "train.num_workers=2", "train.rollouts_per_worker=16", "train.num_iter=16", "train.eval_per_class=0",
        f"train.classes=[{','.join(str(i) for i in range(len(NAMES)))}]", f"train.class_names=[{','.join(NAMES)}]",
        *overrides])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="a train recipe (default: the tiny test policy)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=4, help="timed updates per row")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process row")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    import ray

    from marval_rl.config import load_recipe
    from marval_rl.rl.controller import LocalExecutor, build_trainer, check_train_recipe, make_requests
    from marval_rl.rl.ray_cluster import init_ray
    from marval_rl.rl.ray_trainers import TrainerGroup
    from marval_rl.rl.rollout import WorkerSpec

    tmp = tempfile.TemporaryDirectory()
    recipe = load_recipe(args.recipe, args.set) if args.recipe else tiny_recipe(Path(tmp.name), args.set)
    s = recipe.train
    check_train_recipe(recipe)
    torch.set_num_threads(s.trainer_threads)
    ex = LocalExecutor(WorkerSpec.from_recipe(recipe), s.num_workers)
    local = build_trainer(recipe)
    ex.set_weights(local.weights())
    t0 = time.perf_counter()
    rounds = [ex.rollout(make_requests(recipe, 0, it, local.policy.config.class_num)) for it in range(args.rounds + 1)]
    images = sum(len(b.class_ids) for b in rounds[0])
    print(f"[bench] rollouts for {len(rounds)} rounds: {time.perf_counter() - t0:.1f} s; global batch {images} "
          f"images ({s.num_workers} batches), K={s.num_iter}, {s.algorithm}")
    t0 = time.perf_counter()
    init_ray(s, num_cpus=max(args.ranks) * s.trainer_threads)
    print(f"[bench] ray.init: {time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}")
    rows = []
    try:
        cases = ([("in-process", 1)] if not args.no_local else []) + [(f"ranks x{n}", n) for n in args.ranks]
        for name, n in cases:
            t_start = time.perf_counter()
            if name == "in-process":
                trainer = local
            else:
                r = load_recipe(args.recipe, args.set) if args.recipe else recipe
                r.train.trainer_ranks = n
                trainer = TrainerGroup(r)
            startup = time.perf_counter() - t_start
            try:
                trainer.update(rounds[0])                      # warm-up
                walls, inside = [], []
                for batches in rounds[1:]:
                    t = time.perf_counter()
                    stats = trainer.update(batches)
                    walls.append(time.perf_counter() - t)
                    inside.append(stats.get("time/update_rank", walls[-1]))
            finally:
                if name != "in-process":
                    trainer.shutdown()
            rows.append({"trainer": name, "ranks": n, "update_s": statistics.median(walls),
                         "update_s_all": [round(w, 3) for w in walls], "rank_s": statistics.median(inside),
                         "images_per_s": images / statistics.median(walls), "startup_s": round(startup, 2)})
    finally:
        ray.shutdown()
        tmp.cleanup()
    base = next((r["update_s"] for r in rows if r["trainer"] == f"ranks x{args.ranks[0]}"), None)
    for r in rows:
        r["speedup_vs_first"] = base / r["update_s"] if base else float("nan")
    print(f"\nRL update time at a fixed global batch ({images} images, K={s.num_iter}, {args.rounds} timed "
          f"updates after a warm-up; medians)")
    print(f"{'trainer':<12}{'ranks':>6}{'update s':>10}{'rank s':>9}{'images/s':>10}"
          f"{'speed-up vs x' + str(args.ranks[0]):>18}{'startup s':>11}   all update s")
    for r in rows:
        print(f"{r['trainer']:<12}{r['ranks']:>6}{r['update_s']:>10.3f}{r['rank_s']:>9.3f}{r['images_per_s']:>10.1f}"
              f"{r['speedup_vs_first']:>18.2f}{r['startup_s']:>11.1f}   {r['update_s_all']}")
    print(f"[bench] load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
