"""Peak memory of one reward-gradient update vs truncation k (backprop through the last k AR steps).

    python benchmarks/rl_memory.py                       # shipped student + embedded CLIP, K = 8, CPU
    python benchmarks/rl_memory.py --k 1 4 8 --batch 16 --checkpointing
    python benchmarks/rl_memory.py --device cuda ...     # GPU: torch.cuda.max_memory_allocated

Each k runs in a fresh subprocess so peaks do not mix. On CPU the number is the increase of the
process's peak resident set size during the update (ru_maxrss) over the peak before it; on CUDA it is
``torch.cuda.max_memory_allocated`` during the update.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(args) -> dict:
    import torch

    from marval_rl.config import load_recipe
    from marval_rl.loading import load_generator, load_vae
    from marval_rl.rl.rewards import RewardSet
    from marval_rl.rl.rollout import RolloutWorker, WorkerSpec
    from marval_rl.rl.batch import RolloutRequest
    from marval_rl.rl.trainer import RLTrainer

    torch.set_num_threads(1)
    r = load_recipe(args.recipe, [f"train.grad_last_k={args.one_k}", f"device={args.device}",
                                  f"train.grad_checkpointing={args.checkpointing}", f"train.num_iter={args.num_iter}"])
    s = r.train
    worker = RolloutWorker(WorkerSpec.from_recipe(r))
    trainer = RLTrainer(load_generator(r.model, r.device, expected="marval"), load_vae(r.vae, r.device),
                        RewardSet(s.rewards, [], r.device), s)
    worker.set_weights(trainer.weights())
    batch = worker.rollout(RolloutRequest(0, list(range(args.batch)), seed=0))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    trainer.update([batch])
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"k": args.one_k, "K": args.num_iter, "batch": args.batch, "checkpointing": args.checkpointing,
            "update_s": secs, "peak_extra_mb": (peak - base) / 2 ** 20}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--num-iter", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one-k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_k is not None:
        print(json.dumps(one(args)))
        return
    rows = []
    for k in args.k:
        cmd = [sys.executable, __file__, "--one-k", str(k), "--recipe", args.recipe, "--num-iter", str(args.num_iter),
               "--batch", str(args.batch), "--device", args.device] + (["--checkpointing"] if args.checkpointing else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(out, flush=True)
    print("\n| k (backprop AR steps) | K | batch | checkpointing | update (s) | peak extra memory (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['K']} | {r['batch']} | {r['checkpointing']} | {r['update_s']:.2f} | {r['peak_extra_mb']:.0f} |")


if __name__ == "__main__":
    main()
