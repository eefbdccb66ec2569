"""Sampling speed: MAR teacher (100-step diffusion head) vs MARVAL student (one-step head), same backbone.

    python benchmarks/sampling.py                                  # MAR-B, random weights, CPU
    python benchmarks/sampling.py --num-iter 8 --batch 1           # quick CPU run
    python benchmarks/sampling.py --device cuda --batch 1 64 --num-iter 64 --cfg 1.0 2.9
    python benchmarks/sampling.py --precision fp32 bf16 --compile       # autocast and torch.compile rows
    python benchmarks/sampling.py --precision fp32 bf16 --compile --compile-only student   # shorter on CPU
    python benchmarks/sampling.py --device cuda --compile --compile-mode default reduce-overhead  # + CUDA graphs

``--precision``: every generator runs under each autocast (float32 weights; the one-step head stays
float32, see marval_rl/acceleration.py). ``--compile``: each precision also runs compiled (backbone
and head, dynamic shapes; the compile time is reported separately, not in the per-image time), once
per ``--compile-mode`` (torch.compile's modes; ``reduce-overhead`` records CUDA graphs on a GPU).
``--json`` is rewritten after every timed row, so a run stopped early keeps what it measured.
Ratios in the table: the fp32 teacher's time at the same batch, K and highest cfg over this row's
("vs fp32 teacher"), the fp32 student's over this row's ("vs fp32 student"), and the row's backbone
share of its own time ("backbone floor": 100% would mean the head costs nothing).

Time per image is split into backbone and token-sampler (head) time. The student is built from the
same random teacher (``MARVAL.from_teacher``) and sampled at cfg = 1, as it is used (guidance is
distilled in); the teacher runs at every ``--cfg``. Ratios are teacher time / student time at the same
batch and K, measured in this one run. Weights are random (the head's zero-initialised output layers
are re-drawn so the chain does real work); speed does not depend on the values. Each configuration
runs once after one warm-up call.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from marval_rl.acceleration import COMPILE_MODES, CUDA_GRAPH_MODES, autocast, check_compile_mode, compile_generator
from marval_rl.models import MAR
from marval_rl.models.one_step import MARVAL, OneStepSampler
from marval_rl.sampling import DiffusionSampler, sample_tokens


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedSampler:
    """Wraps a token sampler and accumulates the wall time spent inside it."""

    def __init__(self, inner, device):
        self.inner, self.device, self.seconds = inner, device, 0.0

    def __call__(self, *args):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.inner(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def write_json(path: str, rows: list[dict]) -> None:
    """Atomically: a run stopped mid-write (gpu_check's time limit) leaves the previous complete file."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def add_ratios(rows: list[dict], top_cfg: float) -> list[dict]:
    """Each row's ``vs_fp32_teacher`` (the fp32 teacher at ``top_cfg``, same batch and K) and
    ``vs_fp32_student``, or None while that baseline has not been timed; returns ``rows``."""
    def base(r, head):
        cfg = top_cfg if head == "diffusion" else 1.0
        for b in rows:
            if (b["mode"], b["head"], b["batch"], b["num_iter"], b["cfg"]) == ("fp32", head, r["batch"], r["num_iter"], cfg):
                return b["total_s"]
        return None

    for r in rows:
        t, st = base(r, "diffusion"), base(r, "one-step")
        r["vs_fp32_teacher"] = t / r["total_s"] if t else None
        r["vs_fp32_student"] = st / r["total_s"] if st else None
    return rows


def random_model(spec: str, device, dtype) -> MAR:
    config = json.loads(Path(spec).read_text()).get("constructor") if spec.endswith(".json") else spec
    torch.manual_seed(0)
    model = MAR(config)
    for name, p in model.diffloss.named_parameters():  # undo the zero init of adaLN / output layers
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.to(device=device, dtype=dtype).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mar_base", help="mar_base | mar_large | mar_huge | JSON config")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--num-iter", type=int, nargs="+", default=[64])
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.9])
    ap.add_argument("--head-steps", type=int, nargs="+", default=[100])
    ap.add_argument("--no-student", action="store_true", help="time the teacher only")
    ap.add_argument("--no-teacher", action="store_true", help="time the student only (ratios to the fp32 student)")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true", help="also time compiled generators")
    ap.add_argument("--compile-only", choices=["both", "student", "teacher"], default="both",
                    help="with --compile: which generators get compiled rows (the teacher's 100-step head is the "
                         "long part of a CPU run)")
    ap.add_argument("--compile-mode", nargs="+", default=["default"], choices=list(COMPILE_MODES),
                    help="with --compile: torch.compile modes to time (reduce-overhead / max-autotune: CUDA graphs)")
    ap.add_argument("--json", help="also write the rows to this JSON file (after every row)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = random_model(args.model, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {args.model}: {n_params / 1e6:.1f}M params, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.dtype}")
    student = None if args.no_student else MARVAL.from_teacher(model).eval()
    rows = []

    def run(gen_model, sampler, bsz, k, cfg, head, steps, mode):
        timed = TimedSampler(sampler, device)
        labels = torch.arange(bsz) % model.config.class_num
        sync(device)
        t0 = time.perf_counter()
        sample_tokens(gen_model, labels=labels, num_iter=k, cfg=cfg, token_sampler=timed,
                      generator=torch.Generator().manual_seed(0), record_noise=False)
        sync(device)
        total = time.perf_counter() - t0
        rows.append(dict(mode=mode, batch=bsz, num_iter=k, cfg=cfg, head=head, head_steps=steps, total_s=total,
                         per_image_s=total / bsz, backbone_s=total - timed.seconds, head_s=timed.seconds,
                         head_share=timed.seconds / total))
        r = rows[-1]
        if args.json:
            write_json(args.json, add_ratios(rows, max(args.cfg)))
        print(f"{mode:<13} batch {bsz:>3} K {k:>3} cfg {cfg:<4} {head} {steps:>3} steps: {r['per_image_s']:.3f} s/img "
              f"(backbone {r['backbone_s']:.2f} s, head {r['head_s']:.2f} s)", flush=True)

    import copy

    for cm in args.compile_mode if args.compile else []:
        check_compile_mode(cm, device)
    modes = [(p, None) for p in args.precision] + \
        ([(p, cm) for cm in args.compile_mode for p in args.precision] if args.compile else [])
    with torch.inference_mode():
        for precision, compiled in modes:
            mode = precision + ("" if compiled is None else " compiled" if compiled == "default" else f" {compiled}")
            if compiled is not None:
                # teacher and student share the backbone's code objects, and torch.compile keeps at most
                # recompile_limit (8) versions of each: past it, a later mode would quietly run eager
                torch._dynamo.reset()
            teacher_m = None if args.no_teacher else model if compiled is None else \
                compile_generator(copy.deepcopy(model), compiled) if args.compile_only != "student" else None
            student_m = student if compiled is None or student is None else \
                compile_generator(copy.deepcopy(student), compiled) if args.compile_only != "teacher" else None
            with autocast(precision, device):
                t0 = time.perf_counter()   # warm-up (and, compiled, the compilation) on the largest shapes
                for gm, smp in ([(teacher_m, DiffusionSampler(teacher_m.diffloss, 2))] if teacher_m is not None else []) + \
                        ([(student_m, OneStepSampler(student_m.one_step))] if student_m is not None else []):
                    # every batch size and, for the teacher, CFG's doubled batch: dynamic shapes still
                    # specialise sizes 0 and 1, so batch 1 and its CFG pair (2) are separate graphs
                    cfgs = args.cfg if gm is teacher_m else [1.0]
                    # compiled: warm up at every timed K too, so every head row count (1 included, which
                    # dynamic shapes specialise) is compiled before the clock starts; the teacher's head
                    # runs 2 steps here, its shapes per AR step are those of the 100-step chain
                    ks = sorted({2, *args.num_iter}) if compiled is not None else [2]
                    # CUDA graph trees run a new shape eagerly at its first call and record it at its
                    # second, so graph modes warm up twice: the timed run then only replays graphs
                    for _ in range(2 if compiled in CUDA_GRAPH_MODES else 1):
                        for b, cfg, k in itertools.product(sorted(set(args.batch)), sorted(set(cfgs)), ks):
                            sample_tokens(gm, labels=[0] * b, num_iter=k, cfg=cfg, token_sampler=smp)
                print(f"# {mode}: warm-up{'' if compiled is None else ' and compilation'} {time.perf_counter() - t0:.1f} s")
                for bsz, k in itertools.product(args.batch, args.num_iter):
                    if student_m is not None:
                        run(student_m, OneStepSampler(student_m.one_step), bsz, k, 1.0, "one-step", 1, mode)
                    for cfg, steps in itertools.product(args.cfg, args.head_steps) if teacher_m is not None else ():
                        run(teacher_m, DiffusionSampler(teacher_m.diffloss, steps), bsz, k, cfg, "diffusion", steps, mode)

    print()
    print("| precision | batch | K | cfg | head | s / image | backbone (s) | head (s) | vs fp32 teacher | "
          "vs fp32 student | backbone floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    add_ratios(rows, max(args.cfg))
    for r in rows:
        fmt = lambda v: f"{v:.2f}x" if v else ""
        print(f"| {r['mode']} | {r['batch']} | {r['num_iter']} | {r['cfg']} | {r['head']} {r['head_steps']} | "
              f"{r['per_image_s']:.3f} | {r['backbone_s']:.2f} | {r['head_s']:.2f} | {fmt(r['vs_fp32_teacher'])} | "
              f"{fmt(r['vs_fp32_student'])} | {100 * (1 - r['head_share']):.0f}% |")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
