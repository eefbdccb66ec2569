"""Distillation throughput at 1 and 2 data-parallel ranks (torchrun, gloo, one thread per rank).

    python benchmarks/data_parallel.py [--steps 20] [--batch 64]

Both runs train the embedded student at the same global batch (2 ranks: half each) and, by the rule of
marval_rl/distributed.py, compute the same steps; the table gives samples (student images) per second
over the steps after the first few (start-up, data and latent caching excluded) and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def samples_per_second(ranks: int, steps: int, batch: int, skip: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "marval_rl.cli", "distill", "recipes/distill_embedded.yaml", "data.per_class=8",
           f"distill.generator_optim.steps={steps}", f"distill.fake_optim.steps={steps}",
           f"distill.generator_optim.batch_size={batch}", "distill.checkpoint_every=0",
           "distill.sample_every=0", "distill.log_every=1", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MARVAL_DIST_BACKEND": "gloo"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    rows = [json.loads(x) for x in (out / "distill_metrics.jsonl").read_text().splitlines()]
    t0, t1 = rows[skip - 1]["seconds"], rows[-1]["seconds"]
    return batch * (len(rows) - skip) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the timing")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = {n: samples_per_second(n, a.steps, a.batch, a.skip, Path(tmp) / f"r{n}") for n in (1, 2)}
    print(f"| ranks (1 thread each) | samples / s (global batch {a.batch}) | vs 1 rank |")
    print("|---|---|---|")
    for n, r in rates.items():
        print(f"| {n} | {r:.1f} | {r / rates[1]:.2f}x |")


if __name__ == "__main__":
    main()
