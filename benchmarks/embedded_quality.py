"""Quality and speed of the embedded generators, one table: teacher head steps x CFG, student K sweep.

    python benchmarks/embedded_quality.py                      # shipped teacher + student, 10 images/class
    python benchmarks/embedded_quality.py --per-class 4 --student-k 64 32 16 8 --teacher-k 16
    python benchmarks/embedded_quality.py --precision fp32 bf16 --teacher-steps 100 --cfg 3.0 --student-k 16

``--precision``: each row is generated under that autocast (float32 weights) from the same seeds; the
scores are always computed in float32, so fp32 vs bf16 rows differ by the generation only.

Every row samples ``per-class`` images for each of the 56 classes with the same seed and scores them
with the shipped evaluators: FID-proxy (classifier features vs held-out renders; lower is better) and
classifier accuracy (top-1 = prompted class). Time is wall time per image on this machine.
"""
from __future__ import annotations

import argparse
import json

import torch

from marval_rl.acceleration import PRECISIONS, autocast
from marval_rl.config import asset_path
from marval_rl.eval.evaluate import format_table, generate_images, score_images
from marval_rl.eval.fid import FIDProxy
from marval_rl.models.checkpoints import load_pretrained
from marval_rl.sampling import DiffusionSampler


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=asset_path("embedded/teacher"))
    ap.add_argument("--student", default=asset_path("embedded/student"))
    ap.add_argument("--vae", default=asset_path("embedded/vae"))
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--teacher-k", type=int, default=16)
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=[100, 10, 1])
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="teacher CFG values")
    ap.add_argument("--student-k", type=int, nargs="+", default=[64, 32, 16, 8])
    ap.add_argument("--batch-size", type=int, default=112)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=sorted(PRECISIONS))
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    vae = load_pretrained(args.vae, expected="vae")
    classifier = load_pretrained(asset_path("embedded/classifier"), expected="classifier")
    fid = FIDProxy(classifier, asset_path("embedded/fid"))
    rows = []

    def row(model, name, head, sampler, k, cfg):
        labels = [c for c in range(model.config.class_num) for _ in range(args.per_class)]
        for precision in args.precision:
            with autocast(precision, "cpu"):
                images, secs = generate_images(model, vae, labels, num_iter=k, cfg=cfg, cfg_schedule="linear",
                                               temperature=1.0, token_sampler=sampler, batch_size=args.batch_size,
                                               seed=args.seed, progress=False)
            r = {"generator": name, "head": head, "K": k, "cfg": cfg, "precision": precision,
                 **score_images(images, labels, classifier, fid), "s_per_image": secs / len(labels)}
            rows.append(r)
            print(json.dumps(r), flush=True)

    teacher = load_pretrained(args.teacher, expected="mar")
    for steps in args.teacher_steps:
        for cfg in args.cfg:
            row(teacher, "teacher", f"diffusion {steps}", DiffusionSampler(teacher.diffloss, steps),
                args.teacher_k, cfg)
    try:
        student = load_pretrained(args.student, expected="marval")
    except Exception as e:  # the teacher table is useful on its own (e.g. before distillation)
        print(f"no student: {e}")
        student = None
    if student is not None:
        for k in args.student_k:
            row(student, "student", "one-step", student.default_token_sampler(), k, 1.0)
    print()
    print(format_table(rows, ["generator", "head", "K", "cfg", "precision", "fid_proxy", "classifier_acc", "s_per_image"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
