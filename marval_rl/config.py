"""Typed recipes: dataclass schema + YAML file + ``key=value`` overrides (OmegaConf does the merging).

Every recipe key has exactly one default, in recipe_schema.py (re-exported here). YAML files and command-line overrides only change
values; an unknown key fails with the closest valid key, a wrong type fails naming the key.
``${recipe_dir:}`` inside a value expands to the directory of the recipe file and ``${asset:NAME}``
to a file shipped in the package (``marval_rl/assets``), so recipes work from any directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import math
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from marval_rl.recipe_schema import (  # noqa: F401  (re-exported: the schema's import path is config)
    ModelSection, VAESection, SampleSection, DataSection, OptimSection, VAETrainSection,
    MARTrainSection, ClassifierTrainSection, ClipTrainSection, PretrainSection, DistillSection,
    RewardSpec, TrainSection, EvaluateSection, Recipe, LoraSection)


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown key, wrong type, bad value, missing file."""


# Keys that were renamed: the old name fails with what it became (see ``_check_keys``).
RENAMED_KEYS = {
    "distill.guidance_w": ("distill.cfg", lambda w: 1 + w,
                           "MAR's convention, 1 = no guidance; the old key meant (1 + w) eps(c) - w eps(null), "
                           "so cfg = 1 + guidance_w"),
    "train.train_backbone": ("train.trainable", None,
                             "name the parameter groups that train: [head] (the old false), [all] (the old true), "
                             "or any of head, class_embedding, backbone"),
}



def asset_path(name: str = "") -> str:
    """Path of a file shipped inside the package (``marval_rl/assets/NAME``); ``${asset:NAME}`` in recipes."""
    return str(Path(__file__).parent / "assets" / name)


def _check_keys(schema: type, data: Any, prefix: str = "") -> None:
    """Reject keys the schema does not have, suggesting the closest valid one."""
    if not isinstance(data, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in RENAMED_KEYS:
            new_key, convert, why = RENAMED_KEYS[full]
            try:
                example = f" ({full}={value} is {new_key}={convert(float(value)):g})" if convert else ""
            except (TypeError, ValueError):
                example = ""
            raise RecipeError(f"recipe key '{full}' is now '{new_key}'{example}: {why}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise RecipeError(f"unknown recipe key '{full}'{hint}; valid keys under "
                              f"'{prefix.rstrip('.') or '<top>'}': {sorted(fields)}")
        sub_type = typing.get_type_hints(schema)[key]
        if dataclasses.is_dataclass(sub_type):
            if value is not None and not isinstance(value, dict):
                raise RecipeError(f"recipe key '{full}' is a section; give it as a mapping, got {value!r}")
            _check_keys(sub_type, value, full + ".")


def shipped_recipes() -> dict[str, Path]:
    """name -> file of the recipes shipped in the package (the repo's ``recipes/``, installed as
    ``marval_rl.recipes``)."""
    from importlib.resources import files

    root = Path(str(files("marval_rl.recipes")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def recipe_purpose(path: Path) -> str:
    """The first comment line of a recipe: what it is for."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (``quickstart`` or
    ``quickstart.yaml``); otherwise RecipeError with the closest shipped names."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.exists():
        raise RecipeError(f"recipe {name_or_path}: is a directory, not a YAML file")
    shipped = shipped_recipes()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if len(p.parts) == 1 and name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, list(shipped), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise RecipeError(f"recipe not found: {name_or_path} (neither a file nor a shipped recipe{hint} "
                      f"`marval-rl recipes` lists them)")


ALLOW_ENV = "MARVAL_RL_RECIPE_ENV"   # =1: let recipes read environment variables with ${oc.env:NAME}


def _refuse_environment(node, key: str = "") -> None:
    """A recipe from elsewhere must not read this machine's environment: ``${oc.env:AWS_SECRET}`` would be
    copied into recipe.yaml, the logs and wandb. Opt in with MARVAL_RL_RECIPE_ENV=1."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_environment(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_environment(v, f"{key}[{i}]")
    elif isinstance(node, str) and re.search(r"\$\{\s*oc\.env\s*:", node) and \
            os.environ.get(ALLOW_ENV) != "1":
        raise RecipeError(f"recipe key '{key}': {node!r} reads an environment variable, which recipes may not do "
                          f"(its value would be copied into recipe.yaml, logs and wandb); write the value, or set "
                          f"{ALLOW_ENV}=1 to allow it")


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), schema: type = Recipe):
    """Load ``path`` (a YAML file or a shipped recipe's name) over the schema's defaults, then apply
    ``key=value`` overrides."""
    if path is not None:
        path = find_recipe(path)
    recipe_dir = str(Path(path).resolve().parent) if path else str(Path.cwd())
    # omegaconf 2.4 renamed register_new_resolver; resolution happens below, inside this call.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register("recipe_dir", lambda: recipe_dir, replace=True)
    register("asset", asset_path, replace=True)
    layers = []
    if path is not None:
        try:
            layer = OmegaConf.load(path)
        except OSError as e:
            if "Invalid loaded object type" not in str(e):
                raise RecipeError(f"cannot read recipe {path}: {e}") from e
            layer = str(e).rsplit(":", 1)[-1].strip()   # a scalar at the top level
        except Exception as e:
            raise RecipeError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(layer, DictConfig):
            kind = ("a list" if isinstance(layer, ListConfig) else
                    f"a scalar ({layer})" if isinstance(layer, str) else type(layer).__name__)
            raise RecipeError(f"{path}: the top level of a recipe must be a mapping of sections (model:, sample:, "
                              f"train:, ...), got {kind}")
        layers.append(layer)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key=value")
        if item.partition("=")[2].strip() == "":   # OmegaConf reads it as null: "Incompatible value 'None'"
            key = item.partition("=")[0]
            raise RecipeError(f"override {item!r} has no value after '='; write {key}=VALUE (an empty string: "
                              f"{key}=\"''\", null: {key}=null)")
        try:
            OmegaConf.from_dotlist([item])
        except Exception as e:  # the value is parsed as YAML: "{} and {}" is a broken mapping
            key, _, value = item.partition("=")
            raise RecipeError(f"override {item!r}: the value of '{key}' is not valid YAML "
                              f"({' '.join(str(e).split())}); quote it: {key}='{value}' inside double quotes "
                              f"for the shell, e.g. \"{key}='{value}'\"") from e
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise RecipeError(f"bad override: {e}") from e
    for layer in layers:
        _check_keys(schema, OmegaConf.to_container(layer, resolve=False))
        _refuse_environment(OmegaConf.to_container(layer, resolve=False))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).split("\n")[0]
        raise RecipeError(f"recipe key '{key}': {msg}" if key else f"invalid recipe: {msg}") from e
    check_values(recipe)
    return recipe


# Lists of class ids (and AR step indices): integers only. A float would be truncated (1.7 -> class 1) and
# a bool taken as a class (True -> 1).
INT_LIST_KEYS = ("sample.labels", "train.classes", "evaluate.classes", "data.classes", "train.explore_steps")
CLASS_LIST_KEYS = ("sample.labels", "train.classes", "evaluate.classes")   # ids or names (class_ids_from)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_values(node, prefix: str = "") -> None:
    """The rule every recipe value obeys, whatever command reads it: a float is finite (no key means
    nan or inf: "no limit" is a separate key or null wherever a recipe offers it), float lists too
    (``*.betas``: two numbers in [0, 1)), the class-id lists of :data:`INT_LIST_KEYS` hold integers and
    every ``seed`` is in [0, 2**63).
    Free-form mappings (``model.config``, reward ``kwargs``, ``train.group_lr``) are checked by their
    readers. Raises RecipeError naming the key."""
    for f in dataclasses.fields(node):
        key, v = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(v):
            check_values(v, key + ".")
        elif isinstance(v, float) and not math.isfinite(v):
            raise RecipeError(f"recipe key '{key}' must be a finite number, got {v}")
        elif f.name == "seed" and _is_int(v) and not 0 <= v < 2 ** 63:
            raise RecipeError(f"recipe key '{key}' must be in [0, 2**63), got {v}")
        elif isinstance(v, list):
            if key in INT_LIST_KEYS:
                # class lists may name classes ("lion"); their readers turn names into ids
                named_ok = key in CLASS_LIST_KEYS
                bad = [x for x in v if not (_is_int(x) or (named_ok and isinstance(x, str) and x.strip()))]
                if bad:
                    what = "class ids or class names" if named_ok else "integers"
                    raise RecipeError(f"recipe key '{key}' must list {what}, got {bad!r} in {v!r}")
            if f.name == "betas" and not (len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)):
                raise RecipeError(f"recipe key '{key}' must be two numbers in [0, 1) (Adam's beta1, beta2), got {v!r}")
            for i, x in enumerate(v):
                if dataclasses.is_dataclass(x):
                    check_values(x, f"{key}[{i}].")
                elif isinstance(x, float) and not math.isfinite(x):
                    raise RecipeError(f"recipe key '{key}' must hold finite numbers, got {x} in {v!r}")


def check_optim(o: "OptimSection", key: str, min_steps: int = 1) -> None:
    """The values an optimiser section needs (``key``: where it sits, e.g. ``distill.generator_optim``)."""
    rules = [("steps", o.steps >= min_steps, f">= {min_steps}"), ("batch_size", o.batch_size >= 1, ">= 1"),
             ("lr", o.lr > 0, "> 0"), ("weight_decay", o.weight_decay >= 0, ">= 0"),
             ("warmup_steps", o.warmup_steps >= 0, ">= 0"), ("grad_clip", o.grad_clip >= 0, ">= 0 (0 = off)"),
             ("ema", 0 <= o.ema < 1, "in [0, 1) (0 = off)"),
             ("schedule", o.schedule in ("constant", "cosine"), "constant or cosine")]
    for name, ok, rule in rules:
        if not ok:
            raise RecipeError(f"{key}.{name} must be {rule}, got {getattr(o, name)}")


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device: str, key: str = "device", here: bool = True) -> None:
    """``device`` is cpu, cuda, cuda:N or mps and, with ``here``, one this machine has (N < its GPU count):
    a recipe written for a GPU box stays valid elsewhere (``here=False``), running it is refused here."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        d = None
    if d is None or d.type not in DEVICE_TYPES:
        raise RecipeError(f"{key}: unknown device {device!r}; use cpu, cuda, cuda:N or mps")
    if not here:
        return
    if d.type == "cpu" and d.index not in (None, 0):
        raise RecipeError(f"{key}={device}: the CPU has no device index; use {key}=cpu")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"{key}={device} but this machine has no CUDA GPU (torch.cuda.is_available() is "
                              f"False: no GPU, no driver, or a CPU-only torch); use {key}=cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise RecipeError(f"{key}={device} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(f"{key}={device} but MPS (Apple GPU) is not available here; use {key}=cpu")


def recipe_to_yaml(recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
