"""Turn recipe sections into models: official files or marval-rl checkpoint directories."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from marval_rl.config import ModelSection, RecipeError, VAESection
from marval_rl.hub import HubError, resolve
from marval_rl.models.checkpoints import (CheckpointError, load_official_mar, load_official_vae, load_pretrained,
                                          read_pretrained_config)


def _official_mar_config(section: ModelSection) -> dict:
    from marval_rl.models.mar import FACTORIES, MARConfig

    cfg: dict = {}
    if section.arch.endswith(".json"):
        p = Path(section.arch)
        if not p.is_file():
            raise RecipeError(f"model.arch: config file not found: {p}")
        try:
            doc = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecipeError(f"model.arch: {p} is not valid JSON ({e})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("constructor", doc), dict):
            raise RecipeError(f"model.arch: {p} must hold a JSON object of MAR constructor arguments")
        cfg = dict(doc.get("constructor", doc))
    elif section.arch:
        if section.arch not in FACTORIES:
            raise RecipeError(f"model.arch: unknown MAR factory {section.arch!r}; use one of {sorted(FACTORIES)} "
                              f"or the path of a JSON config")
        cfg = {"factory": section.arch}
    cfg.update(section.config)
    if not cfg:
        raise RecipeError("model.arch (mar_base | mar_large | mar_huge | a JSON config) or model.config "
                          "is needed to load an official MAR checkpoint")
    try:
        MARConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"model.arch / model.config: {e}") from e
    return cfg


def generator_config(section: ModelSection, expected: str | None = None):
    """``(architecture, MARConfig)`` of the recipe's generator, read without loading any weights (for
    checks before anything loads): the same errors as :func:`load_generator` for a missing checkpoint,
    a directory of another kind, or an ill-formed official config."""
    from marval_rl.models.mar import MARConfig
    from marval_rl.models.one_step import MARVALConfig

    if not section.checkpoint:
        raise RecipeError("model.checkpoint is empty: give an official checkpoint-last.pth or a "
                          "marval-rl checkpoint directory")
    path = _checkpoint_path(section.checkpoint, "model.checkpoint")
    if section.checkpoint in ("mar_base", "mar_large", "mar_huge") and not section.arch and not section.config:
        section = dataclasses.replace(section, arch=section.checkpoint)   # as load_generator
    if path.is_dir():
        doc = read_pretrained_config(path)
        arch = doc["architecture"]
        if arch not in ("mar", "marval"):
            raise RecipeError(f"model.checkpoint {path} holds a '{arch}', not a MAR / MARVAL generator")
        if expected is not None and arch != expected:
            raise CheckpointError(f"{path} holds a '{arch}' checkpoint, but a '{expected}' is expected here")
        try:
            cfg = doc["config"] if arch == "mar" else MARVALConfig.from_dict(doc["config"]).mar
            return arch, MARConfig.from_dict(cfg)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path / 'config.json'}: its config does not fit a '{arch}' ({e})") from e
    if not path.is_file():
        raise CheckpointError(_not_a_file(path))
    if expected == "marval":
        raise RecipeError(f"{path} is an official MAR checkpoint, but a MARVAL student is expected here")
    return "mar", MARConfig.from_dict(_official_mar_config(section))


def check_vae_section(section: VAESection) -> None:
    """The VAE checkpoint exists and is a VAE (read without loading weights); empty = no VAE."""
    if not section.checkpoint:
        return
    path = _checkpoint_path(section.checkpoint, "vae.checkpoint")
    if path.is_dir():
        arch = read_pretrained_config(path)["architecture"]
        if arch != "vae":
            raise CheckpointError(f"{path} holds a '{arch}' checkpoint, but a 'vae' is expected here")
    elif not path.is_file():
        raise CheckpointError(_not_a_file(path))


def _not_a_file(path: Path) -> str:
    if path.exists():   # a FIFO or a device (/dev/zero): reading it would block or never end
        return f"{path} exists but is not a regular file (a pipe or a device?), not a checkpoint"
    return f"checkpoint not found: {path}"


def _checkpoint_path(spec: str, key: str) -> Path:
    """A recipe's checkpoint: a local path as given, or a name (``marval-rl download --list``) / hub id
    (``org/repo[/file]``) from the local Hugging Face cache; a missing one names the command that fetches it."""
    try:
        return Path(resolve(spec))
    except HubError as e:
        raise RecipeError(f"{key}: {e}") from None


def _load_mar_safetensors(path: Path, config: dict, ema: bool, device):
    """A bare MAR state dict in safetensors (the hub's mar-large / mar-huge conversions), strictly."""
    import warnings

    from safetensors.torch import load_file

    from marval_rl.models.checkpoints import build_and_load
    from marval_rl.models.mar import MAR

    if ema:
        warnings.warn(f"{path} holds one state dict, not the official file's 'model_ema' (the hub's conversions "
                      f"are reported to be the non-EMA weights; docs/weights.md); model.ema is ignored", stacklevel=2)
    sd = load_file(str(path), device="cpu")
    return build_and_load(lambda: MAR(config), sd, str(path), device)


def load_generator(section: ModelSection, device: str | torch.device = "cpu", expected: str | None = None):
    """A generator in eval mode: a MAR teacher (official ``.pth`` or marval-rl directory) or a MARVAL
    student (marval-rl directory). ``expected`` ("mar" | "marval") rejects the other kind."""
    if not section.checkpoint:
        raise RecipeError("model.checkpoint is empty: give an official checkpoint-last.pth or a "
                          "marval-rl checkpoint directory")
    path = _checkpoint_path(section.checkpoint, "model.checkpoint")
    if section.checkpoint in ("mar_base", "mar_large", "mar_huge") and not section.arch and not section.config:
        section = dataclasses.replace(section, arch=section.checkpoint)   # the table name is the factory name
    if path.is_dir():
        arch = read_pretrained_config(path)["architecture"]
        if arch not in ("mar", "marval"):
            raise RecipeError(f"model.checkpoint {path} holds a '{arch}', not a MAR / MARVAL generator")
        return load_pretrained(path, expected=expected, map_location=device)
    if expected == "marval":
        raise RecipeError(f"{path} is an official MAR checkpoint, but a MARVAL student is expected here")
    if path.suffix == ".safetensors":
        return _load_mar_safetensors(path, _official_mar_config(section), section.ema, device)
    return load_official_mar(path, _official_mar_config(section), ema=section.ema, map_location=device)


def load_vae(section: VAESection, device: str | torch.device = "cpu"):
    """The VAE, or None when the recipe has no VAE checkpoint (then only latents are written)."""
    if not section.checkpoint:
        return None
    path = _checkpoint_path(section.checkpoint, "vae.checkpoint")
    if path.is_dir():
        return load_pretrained(path, expected="vae", map_location=device)
    return load_official_vae(path, section.config or None, map_location=device)
