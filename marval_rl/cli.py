"""``marval-rl`` command line: ``marval-rl COMMAND RECIPE [key=value ...]``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from marval_rl.config import RecipeError, load_recipe, recipe_to_yaml
from marval_rl.models.checkpoints import CheckpointError


def cmd_validate(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe_to_yaml(recipe), end="")
    problems = [f"{name}.checkpoint: {p} does not exist"
                for name, p in (("model", recipe.model.checkpoint), ("vae", recipe.vae.checkpoint))
                if p and not Path(p).exists()]
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def cmd_sample(args) -> int:
    from marval_rl.eval.images import save_grid, save_images
    from marval_rl.loading import load_generator, load_vae
    from marval_rl.sampling import DiffusionSampler, sample_tokens

    recipe = load_recipe(args.recipe, args.overrides)
    s, device = recipe.sample, torch.device(recipe.device)
    model = load_generator(recipe.model, device)
    vae = load_vae(recipe.vae, device)
    labels = [int(x) for x in s.labels] or list(range(min(8, model.config.class_num)))
    labels = [c for c in labels for _ in range(s.num_per_label)]
    sampler = DiffusionSampler(model.diffloss, s.head_steps)
    generator = torch.Generator().manual_seed(s.seed)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    latents, images, t0 = [], [], time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(0, len(labels), s.batch_size), desc="sampling batches"):
            batch = labels[i:i + s.batch_size]
            res = sample_tokens(model, labels=batch, num_iter=s.num_iter, cfg=s.cfg,
                                cfg_schedule=s.cfg_schedule, temperature=s.temperature,
                                generator=generator, token_sampler=sampler, record_noise=False,
                                progress=True)
            latents.append(res.tokens.cpu())
            if vae is not None:
                images.append(((vae.decode_tokens(res.tokens) + 1) / 2).clamp(0, 1).cpu())
    seconds = time.perf_counter() - t0
    summary = {"num_images": len(labels), "seconds": round(seconds, 2), "output_dir": str(out)}
    torch.save({"latents": torch.cat(latents), "labels": torch.tensor(labels)}, out / "latents.pt")
    if images:
        imgs = torch.cat(images)
        save_images(imgs, out / "images", [f"{j:05d}_class{c}" for j, c in enumerate(labels)])
        summary["grid"] = str(save_grid(imgs, out / "grid.png", nrow=s.grid_nrow))
    else:
        print("note: recipe has no vae.checkpoint; wrote latents only", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marval-rl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (("validate", cmd_validate, "print the resolved recipe"),
                               ("sample", cmd_sample, "sample images from the recipe's generator")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("recipe", help="YAML recipe file")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sample.cfg=2.9")
        sp.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (RecipeError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
