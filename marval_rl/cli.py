"""``marval-rl`` command line: ``marval-rl COMMAND RECIPE [key=value ...]``."""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
from tqdm.auto import tqdm

from marval_rl import strict_json
from marval_rl.acceleration import autocast, compile_generator
from marval_rl.config import RecipeError, check_device, load_recipe, recipe_to_yaml
from marval_rl.models.checkpoints import CheckpointError
from marval_rl.errors import user_error
from marval_rl.preflight import (check_generator_inputs, check_output_dir, check_run_settings, check_train_inputs,
                                 prepare_evaluate_output, prepare_output,
                                 validate_sections)
from marval_rl.run_record import check_foreign_run, output_lock, resume_source, write_run_record


def cmd_validate(args) -> int:
    """The resolved recipe on stdout; then every value checked as its command would, and every file the
    recipe names: all the missing ones in one message, each with the command that makes it (exit 2)."""
    from marval_rl.recipe_files import format_missing, missing_files

    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe_to_yaml(recipe), end="")
    try:
        validate_sections(recipe)
        value_error = None
    except Exception as e:  # noqa: BLE001  (a mistake is reported after the files; a bug still raises)
        if user_error(e) is None:
            raise
        value_error = e
    missing = missing_files(recipe, args.recipe)
    if missing:
        print(f"error: {format_missing(missing)}", file=sys.stderr)
    if value_error is not None:
        raise value_error
    return 2 if missing else 0


def cmd_sample(args) -> int:
    from marval_rl.eval.images import save_grid, save_images
    from marval_rl.loading import load_generator, load_vae
    from marval_rl.sampling import sample_tokens

    recipe = load_recipe(args.recipe, args.overrides)
    out = check_output_dir(recipe.output_dir)
    check_foreign_run(out, "sample")          # a train/distill run's folder keeps its own record
    check_generator_inputs(recipe, "sample")
    s, device = recipe.sample, torch.device(recipe.device)
    model = load_generator(recipe.model, device)
    vae = load_vae(recipe.vae, device)
    labels = [int(x) for x in s.labels] or list(range(min(8, model.config.class_num)))
    labels = [c for c in labels for _ in range(s.num_per_label)]
    sampler = token_sampler_for(model, s.head_steps)
    generator = torch.Generator().manual_seed(s.seed)

    if recipe.compile:
        compile_generator(model, recipe.compile_mode)
    latents, images, t0 = [], [], time.perf_counter()
    with torch.inference_mode(), autocast(recipe.precision, device):
        for i in tqdm(range(0, len(labels), s.batch_size), desc="sampling batches"):
            batch = labels[i:i + s.batch_size]
            res = sample_tokens(model, labels=batch, num_iter=s.num_iter, cfg=s.cfg,
                                cfg_schedule=s.cfg_schedule, temperature=s.temperature,
                                generator=generator, token_sampler=sampler, record_noise=False,
                                progress=True)
            latents.append(res.tokens.cpu())
            if vae is not None:
                images.append(vae.decode_images(res.tokens).cpu())
    seconds = time.perf_counter() - t0
    summary = {"num_images": len(labels), "seconds": round(seconds, 2), "output_dir": str(out)}
    lat = torch.cat(latents)
    if not torch.isfinite(lat).all():   # NaN weights sample NaN tokens: say so instead of black PNGs
        raise CheckpointError(f"model.checkpoint {recipe.model.checkpoint}: sampling gave non-finite tokens "
                              f"({(~torch.isfinite(lat)).float().mean().item():.0%} of values); are its weights NaN?")
    out.mkdir(parents=True, exist_ok=True)     # only now: a failed sampling leaves no folder behind
    torch.save({"latents": lat, "labels": torch.tensor(labels)}, out / "latents.pt")
    write_run_record(out, recipe, "sample")
    if images:
        imgs = torch.cat(images)
        save_images(imgs, out / "images", [f"{j:05d}_class{c}" for j, c in enumerate(labels)])
        summary["grid"] = str(save_grid(imgs, out / "grid.png", nrow=s.grid_nrow))
    else:
        print("note: recipe has no vae.checkpoint; wrote latents only", file=sys.stderr)
    print(strict_json.dumps(summary))
    return 0


def data_parallel(out_dir, command: str | None, fn) -> int:
    """Run a command's body under torchrun's process group when it launched us (one process otherwise),
    holding ``out_dir`` for this run (``command``: run_record.output_lock; None: no lock): a rank whose
    peer died stops with one line (the state on disk is intact), and the group is torn down at the end."""
    from marval_rl import distributed

    distributed.stop_on_sigterm(out_dir)
    try:
        if command is None:
            code = fn()
        else:
            with output_lock(out_dir, command):
                code = fn()
    except Exception as e:  # noqa: BLE001
        stop = distributed.stopped_by_peer(e, out_dir)
        if stop is None:
            raise
        print(f"error: {stop}", file=sys.stderr, flush=True)
        distributed.reported_stop()        # (only after the line: a SIGTERM before it prints its own)
        raise SystemExit(2) from None
    distributed.finish()
    return code


def cmd_pretrain(args) -> int:
    from marval_rl import distributed
    from marval_rl.data import build_source
    from marval_rl.pretrain import PRETRAIN_STAGES, PretrainInputs
    from marval_rl.pretrain.common import check_pretrain_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    p, out = recipe.pretrain, check_output_dir(recipe.output_dir)
    check_device(recipe.device)
    check_pretrain_recipe(recipe)
    distributed.world(recipe.device)       # torchrun / accelerate launch: join the process group

    serial = [s for s in p.stages if s not in ("vae", "mar")]
    if distributed.active() and serial:   # before hours of vae/mar training, not when the stage is reached
        raise RecipeError(f"pretrain stage(s) {serial} run in one process; under torchrun only the vae and mar "
                          f"stages are data parallel (run the others without torchrun)")

    def body() -> int:
        for stage in {"vae", "mar"} & set(p.stages):
            distributed.check_divides(getattr(p, stage).optim.batch_size, f"pretrain.{stage}.optim.batch_size")
        distributed.on_main(lambda: prepare_output(recipe, "pretrain", args.overwrite), "preparing the output folder")
        inputs = PretrainInputs(dataset=build_source(recipe.data, "train") if {"vae", "mar"} & set(p.stages) else None)
        summary: dict = {"output_dir": str(out)}
        distributed.on_main(lambda: write_run_record(out, recipe, "pretrain"), "writing the run record")
        for stage in p.stages:
            t0 = time.perf_counter()
            metrics = PRETRAIN_STAGES[stage](recipe, out, inputs)
            summary[stage] = {**{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                              "minutes": round((time.perf_counter() - t0) / 60, 2)}
            if distributed.is_main():
                print(f"[{stage}] done in {summary[stage]['minutes']} min")
        if distributed.is_main():
            print(strict_json.dumps(summary))
        return 0

    return data_parallel(out, "pretrain", body)


def cmd_distill(args) -> int:
    from marval_rl import distributed
    from marval_rl.data import build_source
    from marval_rl.distill.trainer import check_section, distill
    from marval_rl.loading import check_vae_section, generator_config, load_generator, load_vae
    from marval_rl.pretrain.common import check_data_section
    from marval_rl.data.batches import LatentBatches
    from marval_rl.pretrain.mar import check_pair

    recipe = load_recipe(args.recipe, args.overrides)
    check_output_dir(recipe.output_dir)
    check_run_settings(recipe)
    check_section(recipe.distill)
    check_data_section(recipe.data)
    from marval_rl.lora import check_targets

    check_targets(generator_config(recipe.model, expected="mar")[1], recipe.distill.lora, "distill.lora")
    if not recipe.vae.checkpoint:
        raise RecipeError("distill needs vae.checkpoint (the teacher's tokenizer)")
    check_vae_section(recipe.vae)
    distributed.world(recipe.device)       # torchrun / accelerate launch: join the process group
    distributed.check_divides(recipe.distill.generator_optim.batch_size, "distill.generator_optim.batch_size")

    def body() -> int:
        out = distributed.on_main(lambda: prepare_output(recipe, "distill", args.overwrite, args.resume),
                                  "preparing the output folder") or Path(recipe.output_dir)
        teacher = load_generator(recipe.model, recipe.device, expected="mar")
        vae = load_vae(recipe.vae, recipe.device)
        if vae is None:
            raise RecipeError("distill needs vae.checkpoint (the teacher's tokenizer)")
        check_pair(teacher.config, vae, recipe.data.image_size)
        batches = LatentBatches(build_source(recipe.data, "train"), vae, image_size=recipe.data.image_size)
        t0 = time.perf_counter()
        distributed.on_main(lambda: write_run_record(out, recipe, "distill"), "writing the run record")
        _, metrics = distill(teacher, vae, batches, recipe.distill, out, precision=recipe.precision,
                             resume_from=resume_source(args.resume, "distill") if args.resume else None)
        if distributed.is_main():
            print(strict_json.dumps({"output_dir": recipe.output_dir, "student": str(Path(recipe.output_dir) / "student"),
                              "minutes": round((time.perf_counter() - t0) / 60, 2),
                              "world_size": distributed.world_size(),
                              **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}))
        return 0

    return data_parallel(recipe.output_dir, "distill", body)


def cmd_cache(args) -> int:
    from marval_rl import distributed
    from marval_rl.data.latent_cache import run_cache
    from marval_rl.loading import load_vae
    from marval_rl.loading import check_vae_section
    from marval_rl.pretrain.common import check_data_section

    recipe = load_recipe(args.recipe, args.overrides)
    d = recipe.data
    if d.source != "imagefolder":
        raise RecipeError(f"cache reads an image folder: set data.source=imagefolder and data.root=the class "
                          f"folders (got data.source={d.source}); training then reads data.source=latents")
    check_data_section(d)
    if not d.cache_file:
        raise RecipeError("cache needs data.cache_file (the file to write; training reads it with "
                          "data.source=latents data.root=FILE)")
    check_output_dir(str(Path(d.cache_file).parent), "data.cache_file")
    if Path(d.cache_file).is_dir():
        raise RecipeError(f"data.cache_file={d.cache_file} is a folder; give a file name "
                          f"(e.g. imagenet256.safetensors)")
    for name in ("chunk_size", "batch_size"):
        if getattr(args, name) < 1:
            raise RecipeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_device(recipe.device)
    if not recipe.vae.checkpoint:
        raise RecipeError("cache needs vae.checkpoint (the VAE whose latents training will read)")
    check_vae_section(recipe.vae)
    distributed.world(recipe.device)       # torchrun / accelerate launch: join the process group

    def body() -> int:
        main_rank = distributed.is_main()  # asked now: run_cache ends the process group before rank 0's write
        summary = run_cache(recipe, load_vae(recipe.vae, recipe.device), overwrite=args.overwrite,
                            chunk_size=args.chunk_size, batch_size=args.batch_size)
        if main_rank:
            print(strict_json.dumps(summary))
        return 0

    return data_parallel(Path(d.cache_file).parent, None, body)   # (its parts folder is its own record)


def cmd_train(args) -> int:
    from marval_rl.rl.controller import run_training

    recipe = load_recipe(args.recipe, args.overrides)
    check_output_dir(recipe.output_dir)
    check_train_inputs(recipe)
    from marval_rl import distributed

    distributed.world(recipe.device)       # under torchrun: rank 0 alone removes an --overwrite'd run
    with output_lock(recipe.output_dir, "train"):
        if args.overwrite:
            distributed.on_main(lambda: prepare_output(recipe, "train", overwrite=True), "removing the earlier run")
        run_training(recipe, use_ray=False if args.no_ray else None,   # checks resume, writes the run record
                     resume_from=args.resume)
    return 0


def token_sampler_for(model, head_steps):
    """The recipe's token sampler: the model's own (diffusion chain / one step) or a k-step chain."""
    from marval_rl.sampling import DiffusionSampler

    if head_steps is None:
        return model.default_token_sampler()
    if not hasattr(model, "diffloss"):
        raise RecipeError("sample.head_steps applies to a MAR teacher's diffusion head; a MARVAL student "
                          "always samples in one step (leave sample.head_steps unset)")
    return DiffusionSampler(model.diffloss, head_steps)


def cmd_evaluate(args) -> int:
    from marval_rl import distributed
    from marval_rl.eval.evaluate import build_scorers, evaluate_run
    from marval_rl.hub import resolve
    from marval_rl.loading import load_generator, load_vae

    recipe = load_recipe(args.recipe, args.overrides)
    check_output_dir(recipe.output_dir)
    check_generator_inputs(recipe, "evaluate")
    distributed.world(recipe.device)       # torchrun / accelerate launch: join the process group

    def body() -> int:
        # every model and file loads (and is checked) before the output folder is made
        model = load_generator(recipe.model, recipe.device)
        vae = load_vae(recipe.vae, recipe.device)
        scorers, files = build_scorers(recipe, *evaluation_rewards(recipe))
        if recipe.compile:
            compile_generator(model, recipe.compile_mode)
        out = Path(recipe.output_dir) / "evaluate"
        inputs = {"model.checkpoint": resolve(recipe.model.checkpoint), "vae.checkpoint": resolve(recipe.vae.checkpoint),
                  **{f"evaluate.{k}": v for k, v in files.items()}}
        distributed.on_main(lambda: prepare_evaluate_output(recipe, out, args.overwrite, inputs),
                            "preparing the output folder")
        row = evaluate_run(recipe, model, vae, scorers, files, out, token_sampler_for(model, recipe.sample.head_steps))
        if distributed.is_main():
            from marval_rl.eval.evaluate import paper_table

            print(paper_table(row))
            print(strict_json.dumps(row))
        return 0

    return data_parallel(Path(recipe.output_dir) / "evaluate", "evaluate", body)


def evaluation_rewards(recipe) -> tuple[dict, list | None]:
    """The reward metrics of ``evaluate.metrics`` (registry names, built with ``evaluate.reward_kwargs``) on
    the recipe's device, and the class names their prompts use."""
    from marval_rl.eval.evaluate import BUILTIN_METRICS
    from marval_rl.loading import generator_config
    from marval_rl.rewards.registry import build_reward
    from marval_rl.rl.rollout import class_names_for

    e = recipe.evaluate
    names = [m for m in e.metrics if m not in BUILTIN_METRICS]
    if not names:
        return {}, None
    rewards = {n: build_reward(n, **dict(e.reward_kwargs.get(n) or {})).to(recipe.device) for n in names}
    return rewards, class_names_for(generator_config(recipe.model)[1].class_num)


EXAMPLES = """examples:
  marval-rl recipes                                   list the shipped recipes
  marval-rl train quickstart                          RL on the embedded default (CPU, minutes)
  marval-rl train quickstart --no-ray train.iterations=10 output_dir=outputs/try
  marval-rl train my_recipe.yaml --overwrite          start afresh in an output folder that holds a run
  marval-rl report outputs/quickstart_rl              rebuild a run's report.html
  marval-rl distill distill_embedded                  one-step student from the embedded teacher
  marval-rl cache distill_b data.source=imagefolder data.root=IMAGENET/train data.cache_file=in256.safetensors
  torchrun --standalone --nproc_per_node 8 -m marval_rl.cli cache ...   the same, sharded over 8 GPUs
  marval-rl evaluate quickstart_student               FID-proxy and accuracy of a generator
  marval-rl evaluate my_recipe.yaml "evaluate.metrics=[fid,inception_score]" evaluate.num_images=50000 \
      evaluate.reference_stats=fid_stats/adm_in256_stats.npz    FID-50k and IS (docs/evaluate.md)
  marval-rl recipes --copy quickstart .               copy a recipe to edit
  marval-rl download mar_base kl16                    official weights into the Hugging Face cache
"""


def cmd_recipes(args) -> int:
    from marval_rl.config import find_recipe, recipe_purpose, shipped_recipes

    if args.copy:
        name, dest = args.copy
        src = find_recipe(name)
        dest = Path(dest)
        target = dest / src.name if dest.is_dir() else dest
        if target.exists():
            raise RecipeError(f"{target} exists; remove it or copy to another path")
        target.write_text(src.read_text())
        print(f"copied {src.stem} to {target}")
        return 0
    recipes = shipped_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_purpose(path)}")
    return 0


def cmd_report(args) -> int:
    from marval_rl.rl.report import build_report

    out = Path(args.output_dir)
    if not out.is_dir():
        raise RecipeError(f"{out}: not a directory (give the output_dir of a `marval-rl train` run)")
    print(build_report(out))
    return 0


def cmd_download(args) -> int:
    from marval_rl import hub

    if args.list:
        print(hub.format_table())
        print(f"\nmarval-rl download NAME... puts them in the Hugging Face cache ({hub.cache_dir()}), where loaders "
              f"find them by name offline; --dir DIR writes DIR/<the recipes' layout>. docs/weights.md")
        return 0
    if not args.names:
        raise hub.HubError(f"name the weights to download (known names: {', '.join(hub.WEIGHTS)}; or a hub id "
                           f"org/repo[/file]), or --list")
    for name, path in zip(args.names, hub.download(args.names, args.dir)):
        print(f"{name}: {path}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``error: ...``, exit 2) like every other mistake."""

    def error(self, message):
        message = message.replace("recipe, overrides", "recipe")   # the overrides are optional
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from marval_rl.run_record import version

    p = OneLineParser(prog="marval-rl", description=__doc__, epilog=EXAMPLES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"marval-rl {version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, fn, helptext in (("validate", cmd_validate, "print the resolved recipe"),
                               ("sample", cmd_sample, "sample images from the recipe's generator"),
                               ("pretrain", cmd_pretrain, "train the VAE / MAR teacher / evaluators"),
                               ("cache", cmd_cache, "encode an image folder into VAE latents (data.source=latents)"),
                               ("distill", cmd_distill, "GSIM-distill a MAR teacher into a one-step MARVAL student"),
                               ("train", cmd_train, "RL post-training of a MARVAL policy (Ray rollout workers)"),
                               ("evaluate", cmd_evaluate, "sample per class and print quality metrics")):
        sp = sub.add_parser(name, help=helptext, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("recipe", help="a recipe: YAML file, or the name of a shipped one (`marval-rl recipes`)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sample.cfg=2.9")
        if name == "train":
            sp.add_argument("--no-ray", action="store_true",
                            help="run every rollout worker in this process (debugging, tests)")
        if name in ("train", "distill", "pretrain", "evaluate"):
            sp.add_argument("--overwrite", action="store_true",
                            help="start afresh: remove what an earlier run wrote to output_dir")
        if name == "cache":
            from marval_rl.data.latent_cache import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_SIZE

            sp.add_argument("--overwrite", action="store_true",
                            help="start afresh: drop the parts of an earlier run and replace data.cache_file")
            sp.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="N",
                            help="images per part file (the unit a rerun skips; default %(default)s)")
            sp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                            help="images per VAE batch (default %(default)s)")
        if name in ("train", "distill"):
            sp.add_argument("--resume", metavar="PATH",
                            help="continue the state in PATH (a state file or a run's folder) into output_dir")
        sp.set_defaults(fn=fn)
    sp = sub.add_parser("recipes", help="list the shipped recipes, or copy one to edit")
    sp.add_argument("--copy", nargs=2, metavar=("NAME", "DEST"), help="copy recipe NAME to DEST (a file or folder)")
    sp.set_defaults(fn=cmd_recipes)
    sp = sub.add_parser("download", help="fetch released weights by name or hub id (huggingface_hub)",
                        epilog="examples:\n  marval-rl download --list\n  marval-rl download mar_base kl16\n"
                               "  marval-rl download pickscore pickscore_processor --dir pretrained_models\n"
                               "  marval-rl download THUDM/ImageReward/ImageReward.pt\n(docs/weights.md)",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("names", nargs="*", metavar="NAME", help="a name from --list, or a hub id org/repo[/path]")
    sp.add_argument("--dir", default=None, metavar="DIR",
                    help="write to DIR/<the recipes' layout> (e.g. pretrained_models) instead of the HF cache")
    sp.add_argument("--list", action="store_true", help="print the table of known weights and exit")
    sp.set_defaults(fn=cmd_download)
    sp = sub.add_parser("report", help="rebuild OUTPUT_DIR/report.html of an RL run")
    sp.add_argument("output_dir")
    sp.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Options may sit between overrides (`train RECIPE --no-ray a=1 b=2`): what argparse leaves over
    # after the option is more key=value overrides.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    try:
        return args.fn(args)
    except KeyboardInterrupt:   # Ctrl-C: states are written atomically, so what was saved is whole
        saves = args.command in ("train", "distill", "pretrain", "evaluate", "cache")
        print("interrupted (Ctrl-C)" + ("; the last saved state is intact: run the same command again to resume "
                                        "from it" if saves else ""), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (sorted below: an ordinary mistake, or a bug with its traceback)
        message = user_error(e)
        if message is None:
            traceback.print_exception(e)
            print("internal error: this is a bug in marval-rl (or in the plugin named in the traceback); please "
                  "report it with the traceback above and the command you ran", file=sys.stderr)
            return 1
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
