"""Where an RL step's time goes, per precision: sync / rollout (of which: worker sampling, rewards) / update.

    python benchmarks/rl_step_split.py                                  # quickstart recipe, fp32 vs bf16
    python benchmarks/rl_step_split.py --recipe recipes/quickstart_pg.yaml --iterations 12
    python benchmarks/rl_step_split.py --set device=cuda --precision fp32 bf16 fp16

Each precision runs ``marval-rl train RECIPE`` for ``--iterations`` iterations into a temporary folder
(same recipe, seeds and workers) and reports the median of each ``time/*`` key of metrics.jsonl over
the iterations after the first (the first pays for warm-up), and the ratio of each to fp32's. The
keys: ``time/sync`` (weights to the workers), ``time/rollout`` (the controller's wait for all rollout
batches), ``time/worker_rollout`` / ``time/worker_reward`` (inside the slowest worker: K AR steps plus
decoding / reward scoring), ``time/update`` (the trainer's replay, backward and optimiser step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from marval_rl.config import load_recipe
from marval_rl.rl.controller import run_training

KEYS = ("time/sync", "time/rollout", "time/worker_rollout", "time/worker_reward", "time/update")


def medians(recipe_path: str, overrides: list[str], precision: str, iterations: int, use_ray: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        r = load_recipe(recipe_path, [*overrides, f"precision={precision}", f"train.iterations={iterations}",
                                      f"output_dir={out}", "train.eval_every=0", "train.grid_every=0",
                                      "train.checkpoint_every=0"])
        run_training(r, use_ray=use_ray, progress=False)
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "time/update" in x][1:]
    return {k: statistics.median(x[k] for x in rows) for k in KEYS if all(k in x for x in rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides, key=value")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--no-ray", action="store_true", help="in-process rollout worker")
    args = ap.parse_args()
    res = {p: medians(args.recipe, args.set, p, args.iterations, not args.no_ray) for p in args.precision}
    base = res[args.precision[0]]
    print(f"\n{args.recipe}, medians over iterations 2..{args.iterations} (s; ratio to {args.precision[0]})\n")
    print("| precision | " + " | ".join(k.removeprefix("time/") for k in KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for p, m in res.items():
        cells = [f"{m[k]:.3f} ({m[k] / base[k]:.2f}x)" if k in m and base.get(k) else "" for k in KEYS]
        print(f"| {p} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
