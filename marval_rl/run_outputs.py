"""Which marval-rl command makes a path: the folders the commands write, and the shipped embedded models.

A missing ``runs/distill_b/student`` is not a download: ``marval-rl distill distill_b`` writes it. The
loaders' not-found messages (hub.py) and ``marval-rl validate`` (recipe_files.py) ask :func:`making_command`
first, and only then for the ``marval-rl download`` that fetches a released file.

What the commands write under ``output_dir`` (distill/trainer.py, rl/controller.py, pretrain/*.py):
``distill`` -> ``student``; ``train`` -> ``policy``; ``pretrain`` -> ``vae`` (stage vae), ``teacher``
(mar), ``classifier`` and ``fid`` (classifier), ``clip`` (clip).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Making", "making_command", "make_hint", "shipped_outputs", "ASSET_MAKERS"]

PRETRAIN_STAGE_DIRS = {"vae": ("vae",), "mar": ("teacher",), "classifier": ("classifier", "fid"), "clip": ("clip",)}

# A path ending in one of these folders, written by no shipped recipe: the command that writes it, with
# {out} the path's parent (the run's output_dir). RECIPE is the user's own recipe.
_BY_FOLDER = {
    "student": "marval-rl distill RECIPE output_dir={out}",
    "policy": "marval-rl train RECIPE output_dir={out}",
    "teacher": "marval-rl pretrain RECIPE output_dir={out}",
    "vae": "marval-rl pretrain RECIPE output_dir={out}",
    "classifier": "marval-rl pretrain pretrain_embedded pretrain.stages=[classifier] output_dir={out}",
    "fid": "marval-rl pretrain pretrain_embedded pretrain.stages=[classifier] output_dir={out}",
    "clip": "marval-rl pretrain pretrain_clip output_dir={out}",
}

# The shipped embedded models (marval_rl/assets/embedded/NAME) and what made them (README, "The embedded
# default"): the command writes runs/.../NAME, which is then copied into the package's assets.
ASSET_MAKERS = {
    "vae": ("marval-rl pretrain pretrain_embedded", "runs/embedded/vae"),
    "teacher": ("marval-rl pretrain pretrain_embedded", "runs/embedded/teacher"),
    "student": ("marval-rl distill distill_embedded", "runs/distill_embedded/student"),
    "classifier": ("marval-rl pretrain pretrain_embedded pretrain.stages=[classifier] output_dir=runs/embedded",
                   "runs/embedded/classifier"),
    "fid": ("marval-rl pretrain pretrain_embedded pretrain.stages=[classifier] output_dir=runs/embedded",
            "runs/embedded/fid"),
    "clip": ("marval-rl pretrain pretrain_clip output_dir=runs/embedded", "runs/embedded/clip"),
}


@dataclass(frozen=True)
class Making:
    """The command that writes a path, and what to do after it (``then``: e.g. copy into the package)."""
    command: str
    then: str = ""

    def hint(self) -> str:
        return f"make it with `{self.command}`" + (f", then {self.then}" if self.then else "")


def _command_of(name: str, recipe) -> str | None:
    """The command a shipped recipe is for, by the recipes' naming: distill_*, pretrain_*, or an RL recipe
    (one with rewards)."""
    if name.startswith("distill"):
        return "distill"
    if name.startswith("pretrain"):
        return "pretrain"
    return "train" if recipe.train.rewards else None


@functools.lru_cache(maxsize=1)
def shipped_outputs() -> tuple[tuple[tuple[str, ...], str, str], ...]:
    """(path parts of a folder a shipped recipe writes, the recipe's name, its command), e.g.
    (("runs", "distill_b", "student"), "distill_b", "distill")."""
    from marval_rl.config import load_recipe, shipped_recipes

    out = []
    for name, path in shipped_recipes().items():
        recipe = load_recipe(str(path), [])
        command = _command_of(name, recipe)
        if command == "pretrain":
            leaves = [d for stage in recipe.pretrain.stages for d in PRETRAIN_STAGE_DIRS.get(stage, ())]
        else:
            leaves = {"distill": ["student"], "train": ["policy"]}.get(command, [])
        for leaf in leaves:
            out.append((Path(recipe.output_dir, leaf).parts, name, command))
    return tuple(out)


def make_hint(spec) -> str:
    """``"; make it with `...`"`` for a loader's not-found message, or ``""``."""
    making = making_command(spec)
    return f"; {making.hint()}" if making else ""


def making_command(spec) -> Making | None:
    """The command that writes the folder ``spec`` names, or None when no marval-rl command does.

    A folder a shipped recipe writes (``runs/distill_b/student`` -> ``marval-rl distill distill_b``; under
    another root, ``output_dir=`` says where), a shipped embedded model (the command that made it, then
    the copy into the package), or a folder named as the commands name their outputs (``.../student`` ->
    ``marval-rl distill RECIPE output_dir=...``)."""
    from marval_rl.config import asset_path

    path = Path(str(spec)).expanduser()
    parts = path.parts
    if not parts:
        return None
    assets = Path(asset_path("embedded"))
    if path.parent == assets and path.name in ASSET_MAKERS:
        command, written = ASSET_MAKERS[path.name]
        return Making(command, f"copy {written} to {path} (or reinstall marval-rl: it ships this model)")
    for written, name, command in shipped_outputs():
        if parts[-len(written):] == written and len(parts) >= len(written):
            root = Path(*parts[:-len(written)]) if len(parts) > len(written) else None
            where = f" output_dir={path.parent}" if root is not None else ""
            return Making(f"marval-rl {command} {name}{where}")
    # by folder name only where it cannot be a hub id (org/repo): absolute, ./relative, or 3+ parts deep
    if path.name in _BY_FOLDER and (path.is_absolute() or str(spec).startswith(".") or len(parts) > 2):
        return Making(_BY_FOLDER[path.name].format(out=path.parent))
    return None
