"""Typed recipes: dataclass schema + YAML file + ``key=value`` overrides (OmegaConf does the merging).

Every recipe key has exactly one default, here. YAML files and command-line overrides only change
values; an unknown key fails with the closest valid key, a wrong type fails naming the key.
``${recipe_dir:}`` inside a value expands to the directory of the recipe file, so shipped recipes
can point at files next to them wherever the command is run from.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown key, wrong type, bad value, missing file."""


@dataclass
class ModelSection:
    """The MAR generator: an official ``checkpoint-last.pth`` or a marval-rl checkpoint directory."""
    checkpoint: str = ""
    arch: str = ""                     # official files: mar_base | mar_large | mar_huge | path to a JSON config
    config: dict = field(default_factory=dict)  # official constructor arguments (override ``arch``)
    ema: bool = True                   # official files: load 'model_ema' (True) or 'model'


@dataclass
class VAESection:
    """The tokenizer: official ``kl16.ckpt`` or a marval-rl checkpoint directory; empty = no decoding."""
    checkpoint: str = ""
    config: dict = field(default_factory=dict)  # VAEConfig fields for official files (default KL-16)


@dataclass
class SampleSection:
    labels: list = field(default_factory=list)  # class ids; empty = the first min(8, class_num) classes
    num_per_label: int = 1
    batch_size: int = 16
    num_iter: int = 64                 # K, AR iterations
    cfg: float = 1.0                   # MAR guidance scale, 1 = none
    cfg_schedule: str = "linear"       # linear | constant
    temperature: float = 1.0
    head_steps: Optional[int] = None   # diffusion-head steps; None = the model's num_sampling_steps
    seed: int = 0
    grid_nrow: int = 8


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    vae: VAESection = field(default_factory=VAESection)
    sample: SampleSection = field(default_factory=SampleSection)
    device: str = "cpu"
    output_dir: str = "outputs/samples"


def _check_keys(schema: type, data: Any, prefix: str = "") -> None:
    """Reject keys the schema does not have, suggesting the closest valid one."""
    if not isinstance(data, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full = f"{prefix}{key}"
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


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), schema: type = Recipe):
    """Load ``path`` (YAML) over the schema's defaults, then apply ``key=value`` overrides."""
    recipe_dir = str(Path(path).resolve().parent) if path else str(Path.cwd())
    # omegaconf 2.4 renamed register_new_resolver; resolution happens below, inside this call.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register("recipe_dir", lambda: recipe_dir, replace=True)
    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise RecipeError(f"recipe not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:
            raise RecipeError(f"{path} is not valid YAML: {e}") from e
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key=value")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise RecipeError(f"bad override: {e}") from e
    for layer in layers:
        _check_keys(schema, OmegaConf.to_container(layer, resolve=False))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).split("\n")[0]
        raise RecipeError(f"recipe key '{key}': {msg}" if key else f"invalid recipe: {msg}") from e


def recipe_to_yaml(recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
