"""What the commands check before anything loads or writes: the output folder, the sample / evaluate /
train sections against the model's config (no weights read), `validate`'s section checks, and the
output folder's resume policy (run_record.py). Each problem is one RecipeError naming the key."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from marval_rl.acceleration import check_compile, check_compile_mode, check_precision
from marval_rl.config import RecipeError, check_device

def validate_sections(recipe) -> None:
    """What `validate` checks beyond the schema: every section as its command would check it before
    loading (fixed-value fields against their allowed values, the update rule, reward names and files,
    ranges). A device is checked for its name, not for being present here (GPU recipes validate on a
    laptop)."""
    from marval_rl.distill.trainer import check_section
    from marval_rl.pretrain.common import check_pretrain_recipe
    from marval_rl.rl.controller import check_train_recipe

    if recipe.train.rewards:                     # a recipe for `train`
        check_train_recipe(recipe)
    named = [(k, v) for k, v in (("sample.labels", recipe.sample.labels), ("evaluate.classes", recipe.evaluate.classes))
             if any(isinstance(c, str) for c in v)]
    if named:                                    # class names, checked against the model's classes
        from marval_rl.data.prompts import class_ids_from
        from marval_rl.loading import generator_config
        from marval_rl.rl.rollout import class_names_for

        class_num = generator_config(recipe.model)[1].class_num
        try:
            names = class_names_for(class_num)
        except ValueError:
            raise RecipeError(f"{named[0][0]}: class names need a model of the 56 emoji or 1000 ImageNet classes; "
                              f"this one has {class_num}: give class ids") from None
        for key, values in named:
            try:
                class_ids_from(values, names, key)
            except ValueError as e:
                raise RecipeError(str(e)) from e
    check_section(recipe.distill)
    check_pretrain_recipe(recipe, files=False)
    from marval_rl.hub import HubError, resolve

    try:
        here = bool(recipe.model.checkpoint) and Path(resolve(recipe.model.checkpoint)).exists()
    except HubError:
        here = False
    if here:   # the sample / evaluate sections against the model, as those commands check them
        check_generator_inputs(recipe, "sample", device_here=False)
        if recipe.vae.checkpoint:
            check_generator_inputs(recipe, "evaluate", device_here=False)


def check_output_dir(path: str, key: str = "output_dir") -> Path:
    """Fail before anything loads when ``path`` cannot become a folder this run writes to (it is a file, lies
    under a file, or its nearest existing parent refuses a new folder). Creates nothing (a probe folder is
    made and removed in the nearest existing parent)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{key}={path}: {out} is a file, not a folder")
    parent = out
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise RecipeError(f"{key}={path}: {parent} is a file, so no folder can be made under it")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".marval-rl-write-check-"))
    except OSError as e:
        raise RecipeError(f"{key}={path}: cannot create a folder in {parent} ({e.strerror or e})") from None
    return out


def _num_tokens(cfg) -> int:
    return (cfg.img_size // (cfg.vae_stride * cfg.patch_size)) ** 2


def check_run_settings(recipe, here: bool = True) -> None:
    """The device and how passes run on it: ``precision`` for that device, ``compile`` (and its mode) where torch can."""
    check_device(recipe.device, here=here)
    check_precision(recipe.precision, recipe.device)
    check_compile_mode(recipe.compile_mode, recipe.device)
    if recipe.compile_mode != "default" and not recipe.compile:
        raise RecipeError(f"compile_mode={recipe.compile_mode} has no effect with compile=false; set compile=true too")
    if recipe.compile and here:
        check_compile(recipe.compile_mode)


def check_generator_inputs(recipe, command: str, device_here: bool = True):
    """What ``sample`` / ``evaluate`` can check before loading weights: the device, the checkpoints (their
    configs), the sample section against the model (token count, class count, head) and, for evaluate,
    the evaluate section. Returns the model's (architecture, MARConfig)."""
    from marval_rl.loading import check_vae_section, generator_config

    check_run_settings(recipe, here=device_here)
    arch, cfg = generator_config(recipe.model)
    check_vae_section(recipe.vae)
    s, L = recipe.sample, _num_tokens(cfg)
    names = ("batch_size", "num_per_label", "grid_nrow") if command == "sample" else ()
    for name in names:
        if getattr(s, name) < 1:
            raise RecipeError(f"sample.{name} must be >= 1, got {getattr(s, name)}")
    if not 1 <= s.num_iter <= L:
        raise RecipeError(f"sample.num_iter must be in [1, {L}] (the number of tokens), got {s.num_iter}")
    if s.cfg < 1:
        raise RecipeError(f"sample.cfg is MAR's guidance scale (1.0 = no guidance); values below 1 are not "
                          f"meaningful, got {s.cfg}")
    if s.cfg_schedule not in ("linear", "constant"):
        raise RecipeError(f"sample.cfg_schedule must be 'linear' or 'constant', got {s.cfg_schedule!r}")
    if s.temperature < 0:
        raise RecipeError(f"sample.temperature must be >= 0, got {s.temperature}")
    if s.head_steps is not None:
        if arch != "mar":
            raise RecipeError("sample.head_steps applies to a MAR teacher's diffusion head; a MARVAL student "
                              "always samples in one step (leave sample.head_steps unset)")
        if s.head_steps < 1:
            raise RecipeError(f"sample.head_steps must be >= 1 (diffusion-head steps; null = the model's "
                              f"{cfg.num_sampling_steps}), got {s.head_steps}")
    key, classes = ("sample.labels", s.labels) if command == "sample" else ("evaluate.classes", recipe.evaluate.classes)
    if any(isinstance(c, str) for c in classes):   # class names ("lion") -> ids
        from marval_rl.data.prompts import class_ids_from
        from marval_rl.rl.rollout import class_names_for

        try:
            names = class_names_for(cfg.class_num)
        except ValueError:
            raise RecipeError(f"{key}: class names {[c for c in classes if isinstance(c, str)]} need a model of the "
                              f"56 emoji or 1000 ImageNet classes; this one has {cfg.class_num}: give class ids") from None
        try:
            classes[:] = class_ids_from(classes, names, key)
        except ValueError as e:
            raise RecipeError(str(e)) from e
    bad = [c for c in classes if not 0 <= c < cfg.class_num]
    if bad:
        raise RecipeError(f"{key}: labels must lie in [0, {cfg.class_num}) (the model's class_num), got {bad}")
    if command == "evaluate":
        e = recipe.evaluate
        for name in ("per_class", "batch_size"):
            if getattr(e, name) < 1:
                raise RecipeError(f"evaluate.{name} must be >= 1, got {getattr(e, name)}")
        if not recipe.vae.checkpoint:
            raise RecipeError("evaluate needs vae.checkpoint to decode images")
        check_evaluate_section(e, len(classes) or cfg.class_num)
    return arch, cfg


def check_evaluate_section(e, num_classes: int) -> None:
    """The evaluate section's values and files, before any model loads (the Inception weights' layout and
    the reference statistics' shapes are checked when they load, still before anything is written)."""
    from marval_rl.eval.evaluate import BUILTIN_METRICS, INCEPTION_METRICS

    for name in ("save_every", "is_splits"):
        if getattr(e, name) < 1:
            raise RecipeError(f"evaluate.{name} must be >= 1, got {getattr(e, name)}")
    if e.num_images < 0 or e.num_images % num_classes:
        raise RecipeError(f"evaluate.num_images must be 0 (per_class x classes) or a positive multiple of the "
                          f"{num_classes} classes (class-balanced, as FID-50k over ImageNet's 1000), got {e.num_images}")
    if not e.metrics or len(set(e.metrics)) != len(e.metrics) or not all(isinstance(m, str) for m in e.metrics):
        raise RecipeError(f"evaluate.metrics must be a list of distinct names (of {list(BUILTIN_METRICS)} or a "
                          f"reward's), got {list(e.metrics)}")
    rewards = [m for m in e.metrics if m not in BUILTIN_METRICS]
    if rewards:
        from marval_rl.rewards.registry import resolve_reward_class

        from marval_rl.rewards import RewardError

        for name in rewards:
            try:
                resolve_reward_class(name)
            except RewardError as err:
                raise RecipeError(f"evaluate.metrics: {name!r} is none of {list(BUILTIN_METRICS)}, nor a reward "
                                  f"({err})") from None
    extra = sorted(set(e.reward_kwargs) - set(rewards))
    if extra:
        raise RecipeError(f"evaluate.reward_kwargs names {extra}, which are not reward metrics in evaluate.metrics")
    if {"fid_proxy", "accuracy"} & set(e.metrics):
        names = ("classifier", "fid_stats") if "fid_proxy" in e.metrics else ("classifier",)
        for name in names:
            if not Path(getattr(e, name)).is_dir():
                raise RecipeError(f"evaluate.{name}: {getattr(e, name)} is not a folder (the embedded evaluators: "
                                  f"`marval-rl pretrain recipes/pretrain_embedded.yaml pretrain.stages=[classifier]`)")
    n = e.num_images or e.per_class * num_classes
    if "inception_score" in e.metrics and n < e.is_splits:
        raise RecipeError(f"evaluate.is_splits={e.is_splits} needs at least as many images, the recipe makes {n}")
    if set(INCEPTION_METRICS) & set(e.metrics):
        from marval_rl.eval.inception import _torch_fidelity, find_inception_weights, load_npz_stats

        _torch_fidelity()
        if "fid" in e.metrics:
            load_npz_stats(e.reference_stats)
        find_inception_weights(e.inception_weights)


def check_train_inputs(recipe) -> None:
    """What ``train`` can check before ``run_training`` loads anything: the train section (values, class
    ids against the policy's config), the policy and VAE checkpoints, and that every reward name resolves."""
    from marval_rl.loading import check_vae_section, generator_config
    from marval_rl.rewards.registry import resolve_reward_class
    from marval_rl.rl.controller import check_train_recipe

    check_run_settings(recipe)
    _, cfg = generator_config(recipe.model, expected="marval")
    check_train_recipe(recipe, class_num=cfg.class_num)
    if not recipe.vae.checkpoint:
        raise RecipeError("train needs vae.checkpoint to decode images")
    check_vae_section(recipe.vae)
    for specs in (recipe.train.rewards, recipe.train.gold):
        for spec in specs:
            resolve_reward_class(spec.name)
    if not recipe.train.class_names:
        from marval_rl.rl.rollout import class_names_for

        try:
            class_names_for(cfg.class_num)
        except ValueError as e:
            raise RecipeError(f"train.class_names: {e}") from None


def prepare_output(recipe, command: str, overwrite: bool = False, resume: str | None = None) -> Path:
    """The output folder of a command that trains: stale temp files gone, an earlier run's files removed
    (``--overwrite``) or checked to be this recipe's (resume), then the run record written."""
    from marval_rl.models.checkpoints import remove_stale_temps
    from marval_rl import run_record

    out = Path(recipe.output_dir)
    remove_stale_temps(out)
    if overwrite and out.is_dir():
        removed = run_record.overwrite(out, command)
        if removed:
            print(f"[{command}] --overwrite: removed {len(removed)} file(s) of the earlier run in {out}")
    source = run_record.resume_source(resume, command) if resume else None
    if source is not None and run_record.has_state(out, command) and \
            run_record.has_state(out, command).resolve() != source.resolve():
        raise RecipeError(f"--resume {resume}: output_dir {out} holds a run of its own; use another output_dir "
                          f"or --overwrite")
    run_record.check_resume(out, recipe, command, source)
    return out


def prepare_evaluate_output(recipe, out: Path, overwrite: bool, inputs: dict) -> None:
    """OUTPUT_DIR/evaluate: an earlier evaluation of this recipe with the same ``inputs`` (files: weights,
    statistics) resumes, another one's stops the run (``--overwrite`` removes it); stale temp files of a
    killed write are removed."""
    from marval_rl import run_record
    from marval_rl.eval.sharded import PROGRESS_FILE, check_inputs
    from marval_rl.models.checkpoints import atomic_write, remove_stale_temps

    remove_stale_temps(out)
    if overwrite and out.is_dir():
        removed = run_record.overwrite(out, "evaluate")
        if removed:
            print(f"[evaluate] --overwrite: removed {len(removed)} file(s) of the earlier evaluation in {out}")
    run_record.check_resume(out, recipe, "evaluate")
    check_inputs(out, inputs)
    run_record.write_run_record(out, recipe, "evaluate")
    if not (out / PROGRESS_FILE).is_file():   # before any chunk: a folder with chunks always has its state file
        atomic_write(out / PROGRESS_FILE, lambda p: Path(p).write_text('{"chunks_done": 0}'))
