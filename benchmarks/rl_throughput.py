"""Rollout throughput of ``marval-rl train``: rollouts/s with 1 vs 2 Ray rollout workers (same total).

    python benchmarks/rl_throughput.py                                  # tiny test policy, built on the fly
    python benchmarks/rl_throughput.py --recipe recipes/quickstart.yaml # the recipe's policy, VAE and rewards
    python benchmarks/rl_throughput.py --recipe R.yaml --set train.num_iter=16 --rollouts 32 --rounds 3

One local Ray cluster (``--cpus``, default 2) serves every row. Each row builds its executor, syncs the
weights once and warms up with one untimed round; then every round sends ``--rollouts`` images split
evenly over the workers (``executor.rollout``, which is what the controller times as time/rollout:
sampling K AR steps, VAE decoding, rewards, and moving the batches back). The ``in-process`` row is one
``RolloutWorker`` in this process (``--no-ray``'s path), for Ray's overhead. Numbers depend on the machine
and on its load: the ratio is bounded by the free cores, not by the worker count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["tench", "goldfish", "shark", "tiger shark", "hammerhead", "ray", "cock", "hen", "ostrich", "brambling"]


def tiny_spec(tmp: Path, num_iter: int):
    """The tests' tiny policy: the fixture MAR distilled-shape student, a small random VAE, brightness."""
    from marval_rl.config import ModelSection, RewardSpec, VAESection
    from marval_rl.models import AutoencoderKL, VAEConfig, load_official_mar, save_pretrained
    from marval_rl.models.one_step import MARVAL
    from marval_rl.rl.rollout import WorkerSpec

    fx = ROOT / "tests" / "fixtures"
    cfg = json.loads((fx / "tiny_mar" / "config.json").read_text())["constructor"]
    torch.manual_seed(0)
    save_pretrained(MARVAL.from_teacher(load_official_mar(fx / "tiny_mar" / "checkpoint.pth", cfg)), tmp / "student")
    save_pretrained(AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 1, 1, 1), num_groups=8, attn_resolutions=(),
                                            resolution=64)), tmp / "vae")
    return WorkerSpec(model=ModelSection(checkpoint=str(tmp / "student")), vae=VAESection(checkpoint=str(tmp / "vae")),
                      rewards=[RewardSpec(name=f"{fx / 'user_rewards' / 'brightness.py'}:Brightness")],
                      num_iter=num_iter, class_names=NAMES, threads=1), list(range(len(NAMES)))


def recipe_spec(path: str, overrides: list[str]):
    """Worker spec exactly as the controller builds it from a recipe."""
    from marval_rl.config import load_recipe
    from marval_rl.rl.rollout import WorkerSpec

    r = load_recipe(path, overrides)
    return WorkerSpec.from_recipe(r), [int(c) for c in r.train.classes]


def initial_weights(spec):
    from marval_rl.loading import load_generator
    from marval_rl.rl.batch import PolicyWeights

    policy = load_generator(spec.model, spec.device, expected="marval")
    classes = list(range(policy.config.class_num))
    return PolicyWeights.of(0, {f"one_step.{k}": v for k, v in policy.one_step.state_dict().items()}), classes


def requests(total: int, workers: int, version: int, classes: list[int], rnd: int):
    from marval_rl.rl.batch import RolloutRequest

    g = torch.Generator().manual_seed(1000 + rnd)
    ids = [classes[i] for i in torch.randint(0, len(classes), (total,), generator=g).tolist()]
    per = total // workers
    return [RolloutRequest(version, ids[w * per:(w + 1) * per], seed=rnd * 100 + w) for w in range(workers)]


def time_executor(ex, weights, classes, total, workers, rounds):
    ex.set_weights(weights)
    ex.rollout(requests(total, workers, weights.version, classes, -1))   # warm-up: actor start, first calls
    t0 = time.perf_counter()
    n, busy = 0, 0.0
    for r in range(rounds):
        batches = ex.rollout(requests(total, workers, weights.version, classes, r))
        n += sum(len(b.class_ids) for b in batches)
        busy += sum(b.seconds["rollout"] + b.seconds["reward"] for b in batches)
    return n, time.perf_counter() - t0, busy


class InProcess:
    def __init__(self, spec):
        from marval_rl.rl.rollout import RolloutWorker

        self.w = RolloutWorker(spec, 0)

    def set_weights(self, weights):
        self.w.set_weights(weights)

    def rollout(self, reqs):
        return [self.w.rollout(r) for r in reqs]

    def shutdown(self):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="a train recipe (default: the tiny test policy)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rollouts", type=int, default=64, help="images per round, split over the workers")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--num-iter", type=int, default=16, help="K AR steps (tiny policy only)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process row")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    import ray

    from marval_rl.config import TrainSection
    from marval_rl.rl.ray_executor import RayExecutor, init_ray

    tmp = tempfile.TemporaryDirectory()
    spec, classes = (recipe_spec(args.recipe, args.set) if args.recipe else tiny_spec(Path(tmp.name), args.num_iter))
    weights, all_classes = initial_weights(spec)
    classes = classes or all_classes
    torch.set_num_threads(max(1, spec.threads))
    t0 = time.perf_counter()
    init_ray(TrainSection(), num_cpus=args.cpus)
    print(f"[bench] ray.init: {time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}")
    rows = []
    try:
        cases = ([("in-process", 1)] if not args.no_local else []) + [(f"ray x{n}", n) for n in args.workers]
        for name, n in cases:
            if args.rollouts % n:
                sys.exit(f"--rollouts {args.rollouts} does not split over {n} workers")
            t_start = time.perf_counter()
            ex = InProcess(spec) if name == "in-process" else \
                RayExecutor(spec, n, TrainSection(num_workers=n, worker_threads=spec.threads))
            startup = time.perf_counter() - t_start
            try:
                count, secs, busy = time_executor(ex, weights, classes, args.rollouts, n, args.rounds)
            finally:
                ex.shutdown()
            rows.append({"executor": name, "workers": n, "rollouts": count, "seconds": round(secs, 3),
                         "rollouts_per_s": count / secs, "worker_ms_per_image": 1e3 * busy / count,
                         "startup_s": round(startup, 2)})
    finally:
        ray.shutdown()
        tmp.cleanup()
    base = next((r["rollouts_per_s"] for r in rows if r["executor"] == f"ray x{args.workers[0]}"), None)
    for r in rows:
        r["vs_first_ray"] = r["rollouts_per_s"] / base if base else float("nan")
    print(f"\nRL rollout throughput (K={spec.num_iter}, {args.rollouts} images/round x {args.rounds} rounds, "
          f"timed after a warm-up round)")
    print(f"{'executor':<12}{'workers':>8}{'rollouts':>10}{'seconds':>10}{'rollouts/s':>12}"
          f"{'vs ray x' + str(args.workers[0]):>12}{'worker ms/img':>15}{'startup s':>11}")
    for r in rows:
        print(f"{r['executor']:<12}{r['workers']:>8}{r['rollouts']:>10}{r['seconds']:>10.2f}"
              f"{r['rollouts_per_s']:>12.2f}{r['vs_first_ray']:>12.2f}{r['worker_ms_per_image']:>15.2f}"
              f"{r['startup_s']:>11.1f}")
    print("worker ms/img: compute time inside the workers per image (sampling + decoding + rewards); if it grows "
          "with the worker count, the workers are competing for cores")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
