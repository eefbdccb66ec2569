"""What the pretraining stages share besides the loop (training.run_loop): the recipe checks and batching."""
from __future__ import annotations

from pathlib import Path

import torch


STAGES = ("vae", "mar", "classifier", "clip")


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
