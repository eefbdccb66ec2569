"""CLIP score: cosine similarity between an image and its prompt, on open_clip or on transformers' CLIPModel.

``score = scale * cos(E_img(image), E_txt(prompt))``, optionally ``max(cos, 0)`` first (``clamp_negative``).
With ``scale=1`` (default) the value is the raw cosine in [-1, 1]. CLIPScore (Hessel et al. 2021) reports
``w * max(cos, 0)`` with ``w = 2.5``; torchmetrics' ``CLIPScore`` reports ``100 * max(cos, 0)``: pass
``scale=2.5, clamp_negative=True`` or ``scale=100, clamp_negative=True`` to get those numbers.

Weights are loaded from local files only, unless ``pretrained=<tag>`` is given for open_clip (a hub
download, online only). Every path argument also takes a name from ``marval-rl download --list`` or a hub
id (``org/repo`` or ``org/repo/file``), found in the local Hugging Face cache (``marval_rl.hub.resolve``,
offline; docs/weights.md). Text embeddings are cached per prompt (they do not depend on the image), image
preprocessing runs in torch so gradients flow to the pixels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from marval_rl.hub import OPEN_CLIP_FILES, HubError, fetch_hint, resolve

from .base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PromptCache, RewardError, RewardFile, RewardModel, chunks,
                   interpolation_name, normalize, resize_center_crop)

__all__ = ["OpenCLIPScore", "HFCLIPScore", "read_hf_preprocess", "load_open_clip"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _resolve(spec, filename, reward: str):
    """A loader's path argument: local path as given, or a table name / hub id from the local HF cache."""
    try:
        return resolve(spec, filename) if spec else spec
    except HubError as e:
        raise RewardError(f"{reward}: {e}") from None


def _dtype(precision: str | torch.dtype | None) -> torch.dtype:
    if precision is None:
        return torch.float32
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in _DTYPES:
        raise RewardError(f"unknown precision {precision!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[precision]


# ---------------------------------------------------------------------- open_clip
def load_open_clip(model: str, weights: str | None = None, pretrained: str | None = None,
                   random_init: bool = False, device: str = "cpu"):
    """(model, tokenizer, preprocess_cfg) for an open_clip config name or a JSON config file.

    ``weights``: a local ``.safetensors`` / ``.bin`` / ``.pt`` state dict (open_clip reads pickles with
    ``weights_only=True`` and loads strictly), or a table name / hub id (``clip_vit_b32``,
    ``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``: its ``open_clip_model.safetensors``) in the local HF cache.
    ``model``: a config name or a JSON config (a local file or ``org/repo/config.json`` in the cache).
    ``pretrained``: an open_clip tag (downloads; online only).
    """
    import open_clip

    if not (weights or pretrained or random_init):
        raise RewardError(f"clip_score: give weights=<local file> (or pretrained=<tag> when online) for model "
                          f"{model!r}; random_init=True builds random weights (tests, benchmarks only)")
    if weights and pretrained:
        raise RewardError("clip_score: give either weights= (a local file) or pretrained= (a tag), not both")
    name = str(model)
    if name.endswith(".json"):
        path = Path(_resolve(name, None, "clip_score")).expanduser()
        if not path.is_file():
            raise RewardError(f"clip_score: model config file not found: {path}{fetch_hint(name)}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RewardError(f"clip_score: {path} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise RewardError(f"clip_score: {path} is not an open_clip model config (needs embed_dim, vision_cfg, "
                              f"text_cfg)")
        open_clip.add_model_config(path.resolve())  # registers the config under the file's stem
        name = path.stem
    elif name not in open_clip.list_models():
        raise RewardError(f"clip_score: unknown open_clip model {name!r} (not a config name, and not a path to a "
                          f".json config); e.g. ViT-B-32, ViT-H-14, ViT-S-16")
    if weights:
        wpath = Path(_resolve(weights, OPEN_CLIP_FILES, "clip_score")).expanduser()
        if not wpath.is_file():
            raise RewardError(f"clip_score: weights file not found: {wpath}{fetch_hint(weights)}")
        weights = str(wpath)
    try:
        clip = open_clip.create_model(name, pretrained=weights or pretrained, device=device)
    except RewardError:
        raise
    except Exception as e:
        src = weights or pretrained or "random init"
        raise RewardError(f"clip_score: could not build open_clip {name!r} from {src}: {type(e).__name__}: {e}") from e
    tokenizer = open_clip.get_tokenizer(name)
    pp = open_clip.get_model_preprocess_cfg(clip)
    return clip, tokenizer, pp


def _cosine(reward, images, prompts) -> torch.Tensor:
    """cos(image, prompt) of unit-normalised features, clamped at 0 when the reward asks for it."""
    img = reward.image_features(images)
    cos = (img * reward._text(prompts).to(img.device)).sum(-1)
    return cos.clamp(min=0) if reward.clamp_negative else cos


class OpenCLIPScore(RewardModel):
    """CLIP score on an open_clip model (any config, including custom JSON configs).

    kwargs: ``model`` (config name, e.g. "ViT-B-32", or path to a JSON config), ``weights`` (local file, or a
    name / hub id in the local HF cache, e.g. ``clip_vit_b32``),
    ``pretrained`` (tag, online only), ``random_init`` (tests), ``scale`` (1.0), ``clamp_negative`` (False),
    ``precision`` (fp32 | bf16 | fp16), ``device``, ``batch_size`` (images per forward chunk; None = all).
    """

    name = "clip_score"
    differentiable = True
    requires_prompts = True

    @classmethod
    def required_files(cls, kwargs):
        model, weights = str(kwargs.get("model", "ViT-B-32")), kwargs.get("weights")
        files = [RewardFile("model", model)] if model.endswith(".json") else []   # else a config name
        return files + ([RewardFile("weights", str(weights), filename=OPEN_CLIP_FILES)] if weights else [])

    def __init__(self, model: str = "ViT-B-32", weights: str | None = None, pretrained: str | None = None,
                 random_init: bool = False, scale: float = 1.0, clamp_negative: bool = False,
                 precision: str = "fp32", device: str = "cpu", batch_size: int | None = None):
        super().__init__()
        clip, tokenizer, pp = load_open_clip(model, weights, pretrained, random_init, device)
        self.model = clip.to(device=device, dtype=_dtype(precision))
        self.tokenizer = tokenizer
        size = pp.get("size", 224)
        self.image_size = size if isinstance(size, int) else tuple(size)
        self.mean = tuple(pp.get("mean") or OPENAI_CLIP_MEAN)
        self.std = tuple(pp.get("std") or OPENAI_CLIP_STD)
        self.interpolation = interpolation_name(pp.get("interpolation", "bicubic"))
        self.resize_mode = pp.get("resize_mode", "shortest")
        self.scale, self.clamp_negative, self.batch_size = float(scale), bool(clamp_negative), batch_size
        self.model_name, self.weights = str(model), weights or pretrained
        self._text = PromptCache(lambda ps: F.normalize(self._encode_text(ps).float(), dim=-1))
        self.freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Torch version of open_clip's eval transform (Resize -> CenterCrop -> Normalize) on [0, 1] images."""
        crop = self.image_size
        x = resize_center_crop(images, self.image_size, crop=crop, mode=self.interpolation,
                               resize_mode=self.resize_mode)
        return normalize(x, self.mean, self.std)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_text(tokens)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        outs = []
        for sl in chunks(len(images), self.batch_size or len(images)):
            x = self.preprocess(images[sl]).to(self.dtype)
            outs.append(F.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(outs)

    def score(self, images, prompts, metadata):
        return self.scale * _cosine(self, images, prompts)


# ---------------------------------------------------------------------- transformers CLIPModel
def read_hf_preprocess(folder: str | Path) -> dict[str, Any]:
    """Image preprocessing of an HF CLIP processor folder (``preprocessor_config.json``) as torch settings."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        raise RewardError(f"no preprocessor_config.json in {folder} (a CLIP processor folder has it next to the "
                          f"tokenizer files)")
    cfg = json.loads(path.read_text())
    size = cfg.get("size", 224)
    if isinstance(size, dict):
        if "shortest_edge" in size:
            size, mode = int(size["shortest_edge"]), "shortest"
        else:
            size, mode = (int(size["height"]), int(size["width"])), "squash"
    else:
        size, mode = int(size), "shortest"
    crop = cfg.get("crop_size", size)
    if isinstance(crop, dict):
        crop = (int(crop["height"]), int(crop["width"]))
    return {"do_resize": cfg.get("do_resize", True), "size": size, "resize_mode": mode,
            "do_center_crop": cfg.get("do_center_crop", True), "crop": crop,
            "interpolation": interpolation_name(cfg.get("resample", 3)),
            "do_normalize": cfg.get("do_normalize", True),
            "mean": tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), "std": tuple(cfg.get("image_std", OPENAI_CLIP_STD))}


def _check_folder(path: str | Path | None, what: str, reward: str) -> Path:
    if not path:
        raise RewardError(f"{reward}: needs path=<local {what} folder, or a name / hub id in the HF cache>")
    p = Path(_resolve(path, None, reward)).expanduser()
    if not p.is_dir():
        raise RewardError(f"{reward}: {what} folder not found: {p}{fetch_hint(path)}")
    if what in ("model", "config") and not (p / "config.json").is_file():
        raise RewardError(f"{reward}: {p} has no config.json (expected a transformers CLIPModel folder)")
    if what == "model" and not any((p / f).is_file() for f in ("model.safetensors", "pytorch_model.bin",
                                                              "model.safetensors.index.json",
                                                              "pytorch_model.bin.index.json")):
        raise RewardError(f"{reward}: no weights file in {p} (expected model.safetensors or pytorch_model.bin)")
    return p


class HFCLIPScore(RewardModel):
    """CLIP score on a transformers ``CLIPModel`` saved in a local folder (``save_pretrained`` layout).

    kwargs: ``path`` (model folder; or a hub id ``org/repo`` / table name whose snapshot is in the local HF
    cache), ``processor`` (folder with preprocessor_config.json and tokenizer files, same forms; default
    ``path``), ``scale`` (1.0), ``use_logit_scale`` (multiply the cosine by the model's ``logit_scale.exp()``
    instead of ``scale``), ``clamp_negative``, ``precision``, ``device``, ``batch_size``.
    """

    name = "hf_clip_score"
    differentiable = True
    requires_prompts = True

    @classmethod
    def required_files(cls, kwargs):
        path, processor = kwargs.get("path"), kwargs.get("processor") or kwargs.get("path")
        return [RewardFile(k, str(v), kind="dir") for k, v in (("path", path), ("processor", processor)) if v]

    def __init__(self, path: str | None = None, processor: str | None = None, scale: float = 1.0,
                 use_logit_scale: bool = False, clamp_negative: bool = False, precision: str = "fp32",
                 device: str = "cpu", batch_size: int | None = None, max_length: int = 77, random_init: bool = False):
        super().__init__()
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        model_dir = _check_folder(path, "config" if random_init else "model", self.name)
        proc_dir = _check_folder(processor or path, "processor", self.name)
        self.pp = read_hf_preprocess(proc_dir)
        try:
            if random_init:  # the architecture of path/config.json with random weights (tests, benchmarks)
                self.model = CLIPModel(CLIPConfig.from_pretrained(str(model_dir))).to(_dtype(precision))
            else:
                self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True, dtype=_dtype(precision))
            self.tokenizer = AutoTokenizer.from_pretrained(str(proc_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise RewardError(f"{self.name}: could not load from {model_dir} / {proc_dir}: {e}") from e
        self.model.to(device)
        self.scale, self.use_logit_scale, self.clamp_negative = float(scale), bool(use_logit_scale), bool(clamp_negative)
        self.batch_size, self.max_length = batch_size, int(max_length)
        self.path = str(model_dir)
        self._text = PromptCache(lambda ps: F.normalize(self._encode_text(ps).float(), dim=-1))
        self.freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Torch version of CLIPImageProcessor (resize shortest edge, centre crop, rescale, normalise)."""
        pp = self.pp
        x = images
        if pp["do_resize"] or pp["do_center_crop"]:
            x = resize_center_crop(x, pp["size"] if pp["do_resize"] else x.shape[-2:],
                                   crop=pp["crop"] if pp["do_center_crop"] else None,
                                   mode=pp["interpolation"], resize_mode=pp["resize_mode"], crop_rounding="floor")
        return normalize(x, pp["mean"], pp["std"]) if pp["do_normalize"] else x

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device))
        return self.model.text_projection(out.pooler_output)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        outs = []
        for sl in chunks(len(images), self.batch_size or len(images)):
            x = self.preprocess(images[sl]).to(self.dtype)
            pooled = self.model.vision_model(pixel_values=x).pooler_output
            outs.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1))
        return torch.cat(outs)

    def score(self, images, prompts, metadata):
        factor = self.model.logit_scale.exp().float() if self.use_logit_scale else self.scale
        return factor * _cosine(self, images, prompts)
