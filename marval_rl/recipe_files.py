"""Every file a recipe names, whether it is here, and the command that makes each one that is not.

``marval-rl validate`` lists all the missing ones at once, so a GPU user learns in one go what to fetch
or make before the first run. The files:

* ``model.checkpoint`` (and ``model.arch`` when it is a JSON config), ``vae.checkpoint``;
* ``data.root`` when the data is not the rendered emoji set: an image folder, or a latent cache file;
* every optimised and gold reward's files, as the reward class resolves them
  (``RewardModel.required_files``: the same defaults its ``__init__`` uses);
* ``evaluate.classifier`` and ``evaluate.fid_stats`` (folders).

A file is here when :func:`marval_rl.hub.resolve` finds it: a local path, or a table name / hub id in
the local Hugging Face cache (never the network). The command: what a marval-rl command writes
(``runs/distill_b/student`` -> ``marval-rl distill distill_b``, run_outputs.py), else the
``marval-rl download`` that fetches a released file (hub.py), else ``marval-rl cache`` for a latent cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RecipeFile", "recipe_files", "missing_files", "format_missing", "IMAGENET_HINT"]

IMAGENET_HINT = ("the ImageNet (ILSVRC2012) train set, one folder per class (n01440764/, ...): from image-net.org "
                 "under its terms, not fetched by marval-rl (docs/gpu.md)")


@dataclass(frozen=True)
class RecipeFile:
    key: str                 # where the recipe names it: "vae.checkpoint", "train.gold[0].vocab"
    spec: str                # as written: a path, a table name or a hub id
    kind: str = "any"        # "file" | "dir" | "any"
    filename: str | tuple[str, ...] | None = None   # the file a repo spec stands for (hub.resolve)


def recipe_files(recipe) -> list[RecipeFile]:
    """The files ``recipe`` names, in recipe order."""
    from marval_rl.rewards import RewardError
    from marval_rl.rewards.registry import resolve_reward_class

    files = []
    if recipe.model.checkpoint:
        files.append(RecipeFile("model.checkpoint", str(recipe.model.checkpoint)))
    if str(recipe.model.arch).endswith(".json"):
        files.append(RecipeFile("model.arch", str(recipe.model.arch), "file"))
    if recipe.vae.checkpoint:
        files.append(RecipeFile("vae.checkpoint", str(recipe.vae.checkpoint)))
    d = recipe.data
    if d.source != "emoji" and d.root:
        files.append(RecipeFile("data.root", str(d.root), "dir" if d.source == "imagefolder" else "file"))
    for group in ("rewards", "gold"):
        for i, spec in enumerate(getattr(recipe.train, group)):
            try:
                cls = resolve_reward_class(spec.name)
            except RewardError:          # an unknown reward: the value checks name it
                continue
            files += [RecipeFile(f"train.{group}[{i}].{f.kwarg}", f.spec, f.kind, f.filename)
                      for f in cls.required_files(dict(spec.kwargs))]
    for name in ("classifier", "fid_stats"):
        if getattr(recipe.evaluate, name):
            files.append(RecipeFile(f"evaluate.{name}", str(getattr(recipe.evaluate, name)), "dir"))
    return files


def _is_here(f: RecipeFile) -> bool:
    from marval_rl.hub import HubError, resolve

    try:
        path = Path(resolve(f.spec, f.filename)).expanduser()
    except HubError:
        return False
    return {"file": path.is_file, "dir": path.is_dir}.get(f.kind, path.exists)()


def _command(f: RecipeFile, recipe, recipe_name: str) -> str:
    """How to make ``f``: a command in backticks, or what to get when no command can."""
    from marval_rl.hub import fetch_hint
    from marval_rl.run_outputs import making_command

    making = making_command(f.spec)
    if making is not None:
        return making.hint()
    if f.key == "data.root":
        if recipe.data.source == "imagefolder":
            return IMAGENET_HINT
        return (f"make it with `marval-rl cache {recipe_name} data.source=imagefolder data.root=IMAGENET/train "
                f"data.cache_file={f.spec}` (then data.source=latents data.root={f.spec}; docs/gpu.md)")
    hint = fetch_hint(f.spec, f.filename)
    if hint:
        return hint[2:]
    return "no marval-rl command makes it: give a local path (or a name from `marval-rl download --list`)"


def missing_files(recipe, recipe_name: str = "RECIPE") -> list[tuple[RecipeFile, str]]:
    """(file, how to make it) for every file ``recipe`` names that is not here, all of them."""
    return [(f, _command(f, recipe, recipe_name)) for f in recipe_files(recipe) if not _is_here(f)]


def format_missing(missing: list[tuple[RecipeFile, str]]) -> str:
    """One message: a heading line, then one line per missing file with the command that makes it."""
    lines = [f"{len(missing)} file(s) this recipe names are missing:"]
    lines += [f"  {f.key} = {f.spec}: {how}" for f, how in missing]
    return "\n".join(lines)
