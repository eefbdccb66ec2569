"""The GPU check: sampling speed, one RL step of each kind and a few GSIM steps on MAR-B, in one table.

    bash benchmarks/gpu_check.sh            # one GPU: MAR-B, K = 64, batch 1 and 64, cfg 2.9 (< 8 min)
    bash benchmarks/gpu_check.sh --tiny     # any CPU: the embedded models at K = 8 (shows the script works)

Parts, each timed after one warm-up and with the peak memory it adds (CUDA: max_memory_allocated
over the part; CPU: the rise of the process's peak RSS, 0 once an earlier part peaked higher):
1. sampling: ``benchmarks/sampling.py`` on random MAR-B weights, teacher (100-step head, cfg 2.9) vs
   MARVAL student (one-step head), fp32 / bf16, eager / compiled (on a GPU the student compiles in two
   modes: ``default`` and ``reduce-overhead``, i.e. with CUDA graphs); ratios to the fp32 teacher;
2. RL: one ``reward_gradient`` and one ``policy_gradient`` step (rollout + update, grad_last_k = 4,
   gradient checkpointing) of the MAR-B student with a CLIP ViT-B/32-sized reward (open_clip, random
   weights) and a KL-16-sized VAE (random weights), in fp32 and bf16;
3. distillation: GSIM steps of MAR-B (random teacher, latents drawn from N(0, 1): speed does not
   depend on the values), fp32 and bf16.
Weights are random and nothing is downloaded, so the check runs on a machine with no network.
A part that fails (or, for sampling, runs past its time limit) becomes a row saying so, with the rows
it finished, and the other parts still run: one short GPU session always ends with a table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sampling import random_model  # noqa: E402  (the same random MAR-B as the sampling benchmark)

from marval_rl.config import DistillSection, OptimSection, RewardSpec, load_recipe  # noqa: E402
from marval_rl.distill.trainer import GSIMDistiller  # noqa: E402
from marval_rl.models import AutoencoderKL, MARVAL, save_pretrained  # noqa: E402
from marval_rl.models.vae import kl16_config  # noqa: E402

# compile: torch.compile modes for the sampling rows and which generators get them (the teacher's
# compiled 100-step chain is minutes of compilation and CUDA-graph recording); sampling_limit_s: the
# sampling part's wall-clock limit, so that the RL and GSIM parts still run in an 8-minute GPU window
FULL = dict(model="mar_base", batch=[1, 64], num_iter=64, rl_batch=8, group=4, distill_batch=32, distill_steps=3,
            reward={"name": "clip_score", "kwargs": {"model": "ViT-B-32", "random_init": True}},
            compile=["default", "reduce-overhead"], compile_only="student", sampling_limit_s=300)
TINY = dict(model="embedded", batch=[1, 4], num_iter=8, rl_batch=4, group=2, distill_batch=8, distill_steps=2,
            reward={"name": "embedded_clip"}, compile=["default"], compile_only="both", sampling_limit_s=900)


def failed_row(part: str, what: str, error: BaseException | str) -> dict:
    """A part that did not finish, as a table row (its first error line, not a traceback)."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return {"part": part, "what": f"{what}: FAILED ({type(error).__name__}: {line[:160]})"
            if isinstance(error, BaseException) else f"{what}: {error}", "batch": None, "K": None,
            "precision": "", "seconds": None, "unit": "", "peak_gb": None, "ratio": None}


class Peak:
    """Peak memory a block adds: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        peak = torch.cuda.max_memory_allocated() if self.cuda else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.gb = (peak - self.base) / 2 ** 30


def teacher_and_vae(size: dict, device: torch.device):
    """The random MAR-B teacher and KL-16 VAE (full), or the shipped embedded teacher and VAE (tiny)."""
    if size["model"] == "embedded":
        from marval_rl.config import asset_path
        from marval_rl.models import load_pretrained

        return (load_pretrained(asset_path("embedded/teacher"), map_location=str(device)),
                load_pretrained(asset_path("embedded/vae"), map_location=str(device)))
    torch.manual_seed(0)
    return random_model(size["model"], device, torch.float32), AutoencoderKL(kl16_config()).to(device).eval()


def sampling_rows(size: dict, device: torch.device, teacher, tmp: Path, compile_: bool) -> list[dict]:
    """benchmarks/sampling.py in a subprocess (its own warm-ups and compilation), rows from its JSON."""
    spec = size["model"]
    if spec == "embedded":   # sampling.py takes a JSON file with the constructor dict
        spec = str(tmp / "embedded_mar.json")
        Path(spec).write_text(json.dumps({"constructor": teacher.config.to_dict()}))
    out = tmp / "sampling.json"
    modes = [m for m in size["compile"] if device.type == "cuda" or m == "default"]   # CUDA graphs: GPU only
    cmd = [sys.executable, str(HERE / "sampling.py"), "--model", spec, "--device", str(device),
           "--batch", *map(str, size["batch"]), "--num-iter", str(size["num_iter"]), "--cfg", "2.9",
           "--precision", "fp32", "bf16", "--json", str(out)] + \
        (["--compile", "--compile-mode", *modes, "--compile-only", size["compile_only"]] if compile_ else [])
    problem = None
    try:
        subprocess.run(cmd, check=True, stdout=sys.stderr, timeout=size["sampling_limit_s"])
    except subprocess.TimeoutExpired:
        problem = f"stopped at the {size['sampling_limit_s']} s limit; the rows above are what it finished"
    except subprocess.CalledProcessError as e:
        problem = f"FAILED (exit {e.returncode}, see stderr); the rows above are what it finished"
    try:
        measured = json.loads(out.read_text()) if out.exists() else []
    except json.JSONDecodeError as e:   # sampling.py writes atomically; this is a safety net
        measured, problem = [], f"unreadable rows ({e})"
    rows = [{"part": "sampling", "what": f"{'teacher 100-step' if r['head'] == 'diffusion' else 'student one-step'}"
             f" cfg {r['cfg']}", "batch": r["batch"], "K": r["num_iter"], "precision": r["mode"],
             "seconds": r["per_image_s"], "unit": "s/image", "peak_gb": None, "ratio": r["vs_fp32_teacher"]}
            for r in measured]   # sampling.py's ratios, in every (also partial) write of its rows
    return rows + ([failed_row("sampling", "benchmarks/sampling.py", problem)] if problem else [])


def rl_rows(size: dict, device: torch.device, teacher, vae, tmp: Path) -> list[dict]:
    """One rollout + update per algorithm and precision (after a warm-up step), with its peak memory."""
    save_pretrained(MARVAL.from_teacher(teacher), tmp / "student")
    save_pretrained(vae, tmp / "vae")
    rows = []
    for algorithm in ("reward_gradient", "policy_gradient"):
        for precision in ("fp32", "bf16"):
            try:
                rows += rl_step_rows(size, device, tmp, algorithm, precision)
            except Exception as e:   # noqa: BLE001  (the table reports it; the other parts still run)
                rows.append(failed_row("rl", f"{algorithm} step, {precision}", e))
            print(json.dumps(rows[-2:]), file=sys.stderr, flush=True)
    return rows


def rl_step_rows(size: dict, device: torch.device, tmp: Path, algorithm: str, precision: str) -> list[dict]:
    """The rollout and the update row of one algorithm at one precision."""
    from marval_rl.loading import load_generator, load_vae
    from marval_rl.rl.batch import RolloutRequest
    from marval_rl.rl.rewards import RewardSet
    from marval_rl.rl.rollout import RolloutWorker, WorkerSpec
    from marval_rl.rl.trainer import RLTrainer

    group = size["group"] if algorithm == "policy_gradient" else 1
    r = load_recipe(None, [f"model.checkpoint={tmp / 'student'}", f"vae.checkpoint={tmp / 'vae'}",
                           f"device={device}", f"precision={precision}", f"train.algorithm={algorithm}",
                           f"train.num_iter={size['num_iter']}", "train.grad_last_k=4",
                           "train.grad_checkpointing=true", f"train.group_size={group}",
                           f"train.optim.batch_size={size['rl_batch']}"])
    r.train.rewards = [RewardSpec(**size["reward"])]
    worker = RolloutWorker(WorkerSpec.from_recipe(r))
    trainer = RLTrainer(load_generator(r.model, r.device, expected="marval"), load_vae(r.vae, r.device),
                        RewardSet(r.train.rewards, [], r.device, precision), r.train, precision)
    classes = [c // group for c in range(size["rl_batch"])]
    for step in range(2):      # the first is the warm-up (kernels, allocator, cuBLAS handles)
        worker.set_weights(trainer.weights())
        with Peak(device) as rollout:
            batch = worker.rollout(RolloutRequest(step, classes, seed=step, group_size=group,
                                                  share_noise=group > 1))
        with Peak(device) as update:
            trainer.update([batch])
    what = f"{algorithm} step, batch {size['rl_batch']}"
    return [{"part": "rl", "what": f"{what}: {name}", "batch": size["rl_batch"], "K": size["num_iter"],
             "precision": precision, "seconds": p.seconds, "unit": "s", "peak_gb": p.gb, "ratio": None}
            for name, p in (("rollout", rollout), ("update", update))]


class GaussianLatents:
    """Benchmark input for distillation: latents from N(0, 1) with random labels (speed does not
    depend on the values; the embedded and ImageNet sources are timed by their own tests)."""

    def __init__(self, teacher):
        c = teacher.config
        self.shape = (c.vae_embed_dim, c.img_size // c.vae_stride, c.img_size // c.vae_stride)
        self.classes = c.class_num

    def sample(self, batch_size: int, gen: torch.Generator, device):
        latents = torch.randn((batch_size, *self.shape), generator=gen).to(device)
        return latents, torch.randint(0, self.classes, (batch_size,), generator=gen).to(device)


def distill_rows(size: dict, device: torch.device, teacher, tmp: Path) -> list[dict]:
    """GSIM steps (S_phi update, then the student's) after one warm-up step, per precision."""
    def optim(ema):
        return OptimSection(steps=1 + size["distill_steps"], batch_size=size["distill_batch"], lr=1e-5,
                            betas=[0.0, 0.999], weight_decay=0.0, warmup_steps=0, grad_clip=1.0, ema=ema)

    rows = []
    for precision in ("fp32", "bf16"):
        try:
            rows.append(gsim_row(size, device, teacher, precision, optim))
        except Exception as e:   # noqa: BLE001  (the table reports it)
            rows.append(failed_row("distill", f"GSIM step, {precision}", e))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def gsim_row(size: dict, device: torch.device, teacher, precision: str, optim) -> dict:
    """The mean time of ``distill_steps`` GSIM steps at one precision."""
    d = GSIMDistiller(teacher, DistillSection(cfg=2.9, generator_optim=optim(0.99), fake_optim=optim(0.0)),
                      precision)
    d.batches = GaussianLatents(teacher)
    by_name = {t.name: t for t in d.trainables}
    gen = torch.Generator().manual_seed(0)
    d.step(0, gen, lambda name, loss: by_name[name].update(loss))   # warm-up
    with Peak(device) as p:
        for step in range(1, 1 + size["distill_steps"]):
            d.step(step, gen, lambda name, loss: by_name[name].update(loss))
    return {"part": "distill", "what": f"GSIM step, batch {size['distill_batch']}", "batch": size["distill_batch"],
            "K": None, "precision": precision, "seconds": p.seconds / size["distill_steps"], "unit": "s/step",
            "peak_gb": p.gb, "ratio": None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the embedded models at K = 8 (a CPU run of the same code)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled sampling rows")
    ap.add_argument("--sampling-limit-s", type=float, help="wall-clock limit of the sampling part "
                    "(default: 300 s full, 900 s tiny)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    device, size = torch.device(args.device), dict(TINY if args.tiny else FULL)
    if args.sampling_limit_s is not None:
        size["sampling_limit_s"] = args.sampling_limit_s
    t0 = time.perf_counter()
    teacher, vae = teacher_and_vae(size, device)
    name = "embedded teacher" if args.tiny else f"{size['model']} (random weights)"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = sampling_rows(size, device, teacher, tmp, not args.no_compile)
        rows += rl_rows(size, device, teacher, vae, tmp)
        rows += distill_rows(size, device, teacher, tmp)
    print(f"\n# gpu_check: {name} on {where}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s in all\n")
    print("| part | what | batch | K | precision | time | peak memory added (GB) | vs fp32 teacher |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        ratio = "" if not r["ratio"] else f"{r['ratio']:.2f}x"
        time_ = "" if r["seconds"] is None else f"{r['seconds']:.3f} {r['unit']}"
        print(f"| {r['part']} | {r['what']} | {r['batch'] or ''} | {r['K'] or ''} | {r['precision']} | "
              f"{time_} | {peak} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
