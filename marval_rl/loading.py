"""Turn recipe sections into models: official files or marval-rl checkpoint directories."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from marval_rl.config import ModelSection, RecipeError, VAESection
from marval_rl.models.checkpoints import (load_official_mar, load_official_vae, load_pretrained,
                                          read_pretrained_config)


def _official_mar_config(section: ModelSection) -> dict:
    cfg: dict = {}
    if section.arch.endswith(".json"):
        p = Path(section.arch)
        if not p.is_file():
            raise RecipeError(f"model.arch: config file not found: {p}")
        doc = json.loads(p.read_text())
        cfg = dict(doc.get("constructor", doc))
    elif section.arch:
        cfg = {"factory": section.arch}
    cfg.update(section.config)
    if not cfg:
        raise RecipeError("model.arch (mar_base | mar_large | mar_huge | a JSON config) or model.config "
                          "is needed to load an official MAR checkpoint")
    return cfg


def load_generator(section: ModelSection, device: str | torch.device = "cpu", expected: str | None = None):
    """A generator in eval mode: a MAR teacher (official ``.pth`` or marval-rl directory) or a MARVAL
    student (marval-rl directory). ``expected`` ("mar" | "marval") rejects the other kind."""
    if not section.checkpoint:
        raise RecipeError("model.checkpoint is empty: give an official checkpoint-last.pth or a "
                          "marval-rl checkpoint directory")
    path = Path(section.checkpoint)
    if path.is_dir():
        arch = read_pretrained_config(path)["architecture"]
        if arch not in ("mar", "marval"):
            raise RecipeError(f"model.checkpoint {path} holds a '{arch}', not a MAR / MARVAL generator")
        return load_pretrained(path, expected=expected, map_location=device)
    if expected == "marval":
        raise RecipeError(f"{path} is an official MAR checkpoint, but a MARVAL student is expected here")
    return load_official_mar(path, _official_mar_config(section), ema=section.ema, map_location=device)


def load_vae(section: VAESection, device: str | torch.device = "cpu"):
    """The VAE, or None when the recipe has no VAE checkpoint (then only latents are written)."""
    if not section.checkpoint:
        return None
    path = Path(section.checkpoint)
    if path.is_dir():
        return load_pretrained(path, expected="vae", map_location=device)
    return load_official_vae(path, section.config or None, map_location=device)
