"""What the pretraining stages share besides the loop (training.run_loop): the stage registry and the
recipe checks.

A stage of ``marval-rl pretrain`` registers its runner by name where it is defined
(``@register_pretrain_stage("vae")``); the runner gets the recipe, the output folder and the
:class:`PretrainInputs` earlier stages left (the VAE a ``mar`` stage needs) and returns its metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


# the order `pretrain.stages` lists them in the docs; every name here must be registered
STAGES = ("vae", "mar", "classifier", "clip")
PRETRAIN_STAGES: dict[str, Callable[[Any, Path, "PretrainInputs"], dict]] = {}


@dataclass
class PretrainInputs:
    """What one ``marval-rl pretrain`` run's stages share: the training images (built once, for the
    stages that read them) and the VAE a stage trained or loaded."""
    dataset: Any = None
    vae: Any = None


def loop_settings(recipe) -> dict:
    """The shared loop's settings for a stage, from the ``pretrain:`` section (and the device)."""
    p = recipe.pretrain
    return dict(seed=p.seed, log_every=p.log_every, checkpoint_every=p.checkpoint_every,
                sample_every=p.sample_every, device=recipe.device)


def register_pretrain_stage(name: str):
    """Decorator: ``fn(recipe, out_dir, inputs) -> metrics`` runs stage ``name`` of ``marval-rl pretrain``."""
    def register(fn):
        PRETRAIN_STAGES[name] = fn
        return fn
    return register


def check_data_section(d, key: str = "data", files: bool = True) -> None:
    """The ``data:`` section, before any image is rendered or read; RecipeError naming the key."""
    from marval_rl.config import RecipeError

    if d.source not in ("emoji", "imagefolder", "latents"):
        raise RecipeError(f"{key}.source must be emoji, imagefolder or latents, got {d.source!r}")
    if d.image_size < 1:
        raise RecipeError(f"{key}.image_size must be >= 1, got {d.image_size}")
    if d.per_class < 1:
        raise RecipeError(f"{key}.per_class must be >= 1 (renders per class; fewer is an empty dataset), "
                          f"got {d.per_class}")
    if d.num_workers < 0:
        raise RecipeError(f"{key}.num_workers must be >= 0, got {d.num_workers}")
    if d.source == "emoji":
        if d.augment not in ("none", "light", "full"):
            raise RecipeError(f"{key}.augment must be none, light or full, got {d.augment!r}")
        from marval_rl.data.emoji import NUM_CLASSES

        bad = [c for c in d.classes if not 0 <= c < NUM_CLASSES]
        if bad or len(set(d.classes)) != len(d.classes):
            raise RecipeError(f"{key}.classes must be distinct emoji class ids in [0, {NUM_CLASSES}), got {list(d.classes)}")
    else:
        want = "folder of class sub-folders" if d.source == "imagefolder" else "file written by cache_latents"
        root = Path(d.root) if d.root else None
        if root is None:
            raise RecipeError(f"{key}.source={d.source} needs {key}.root (the {want})")
        ok = root.is_dir() if d.source == "imagefolder" else root.is_file()
        if files and not ok:   # (files=False: `validate` of a recipe for another machine only warns)
            raise RecipeError(f"{key}.root={d.root}: {'no such folder' if d.source == 'imagefolder' else 'no such file'} "
                              f"(the {want})")


def check_pretrain_recipe(recipe, files: bool = True) -> None:
    """Everything ``marval-rl pretrain`` can check before it renders data or builds a model (``files``:
    also that the data files exist)."""
    from marval_rl.config import RecipeError, check_optim

    p = recipe.pretrain
    unknown = [s for s in p.stages if s not in STAGES]
    if unknown or not p.stages:
        what = f"unknown stage(s) {unknown}" if unknown else "no stage given"
        raise RecipeError(f"pretrain.stages: {what}; use any of {', '.join(STAGES)}")
    if p.log_every < 1:
        raise RecipeError(f"pretrain.log_every must be >= 1, got {p.log_every}")
    for name in ("sample_every", "checkpoint_every"):
        if getattr(p, name) < 0:
            raise RecipeError(f"pretrain.{name} must be >= 0 (0 = off), got {getattr(p, name)}")
    check_data_section(recipe.data, files=files)
    for stage in p.stages:
        check_optim(getattr(p, stage).optim, f"pretrain.{stage}.optim")
    if "vae" in p.stages:
        from marval_rl.models.vae import VAEConfig

        if p.vae.kl_weight < 0:
            raise RecipeError(f"pretrain.vae.kl_weight must be >= 0, got {p.vae.kl_weight}")
        try:
            config = VAEConfig.from_dict(dict(p.vae.config))
        except (TypeError, ValueError) as e:
            raise RecipeError(f"pretrain.vae.config: {e}") from e
        if recipe.data.image_size % config.stride:
            raise RecipeError(f"data.image_size {recipe.data.image_size} is not divisible by the VAE stride "
                              f"{config.stride} (pretrain.vae.config.ch_mult)")
    if "mar" in p.stages:
        from marval_rl.models.mar import MARConfig

        try:
            MARConfig.from_dict(dict(p.mar.config))
        except (TypeError, ValueError) as e:
            raise RecipeError(f"pretrain.mar.config: {e}") from e
        if "vae" not in p.stages:
            if not recipe.vae.checkpoint:
                raise RecipeError("stage 'mar' needs a VAE: run stage 'vae' first or set vae.checkpoint")
            from marval_rl.loading import check_vae_section

            check_vae_section(recipe.vae)
    for stage in ("classifier", "clip"):
        if stage in p.stages and getattr(p, stage).test_per_class < 1:
            raise RecipeError(f"pretrain.{stage}.test_per_class must be >= 1, got {getattr(p, stage).test_per_class}")
