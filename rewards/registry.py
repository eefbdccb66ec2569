"""Resolve reward specs from recipes: short names, ``pkg.module:Class`` and ``path/to/file.py:Class``.

Examples::

    build_reward("clip_score", model="ViT-B-32", weights="/models/vit_b32.safetensors")
    build_reward({"name": "pickscore", "kwargs": {"path": "/models/PickScore_v1"}})
    build_reward("rewards/examples/colorfulness.py:Colorfulness", target=0.4)
    build_reward({"name": "composite", "kwargs": {"rewards": [...], "gold": [...]}})

Modules named by a dotted path are imported normally; a file path is loaded from exactly that file (relative
paths are relative to the current directory, or to ``base_dir`` when given). Nothing is scanned.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from marval_rl.plugins import load_file_module

from .base import RewardError, RewardModel

__all__ = ["REWARDS", "build_reward", "resolve_reward_class", "known_rewards", "SPEC_KEYS"]

# short name -> "module:Class" (imported lazily: building a classifier reward does not import transformers)
REWARDS: dict[str, str] = {
    "clip_score": "marval_rl.rewards.clip_score:OpenCLIPScore",
    "hf_clip_score": "marval_rl.rewards.clip_score:HFCLIPScore",
    "pickscore": "marval_rl.rewards.pickscore:PickScore",
    "image_reward": "marval_rl.rewards.image_reward:ImageReward",
    "fid_proxy": "marval_rl.rewards.fid_proxy:FIDProxyReward",
    "classifier": "marval_rl.rewards.classifier:ClassifierReward",
    "efficientnet_classifier": "marval_rl.rewards.classifier:EfficientNetClassifierReward",
    "embedded_clip": "marval_rl.rewards.embedded_clip:EmbeddedCLIPScore",
    "composite": "marval_rl.rewards.composite:CompositeReward",
}

# Keys a dict spec may carry. ``weight``/``normalize``/``scale``/``shift``/``gold`` are read by the composite;
# a single reward built from such a dict ignores them.
SPEC_KEYS = {"name", "kwargs", "weight", "normalize", "scale", "shift", "gold", "label"}


def known_rewards() -> list[str]:
    return sorted(REWARDS)


def _load_file_module(path: Path):
    try:
        return load_file_module(path, prefix="rewards_user")
    except ImportError as e:
        raise RewardError(str(e)) from e


def resolve_reward_class(name: str, base_dir: str | Path | None = None) -> type:
    """The class a spec name refers to (short name, ``module:Class`` or ``file.py:Class``)."""
    if not isinstance(name, str) or not name.strip():
        raise RewardError(f"a reward name must be a non-empty string, got {name!r}; known: {', '.join(known_rewards())}")
    target = REWARDS.get(name, name)
    if ":" not in target:
        import difflib

        close = difflib.get_close_matches(name, known_rewards(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RewardError(f"unknown reward {name!r}{hint}; known rewards: {', '.join(known_rewards())}; "
                          f"or give 'package.module:Class' or 'path/to/file.py:Class'")
    where, _, cls_name = target.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        path = path.resolve()
        if not path.is_file():
            raise RewardError(f"reward file not found: {path} (from spec {name!r})")
        module = _load_file_module(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            if name in REWARDS:  # a built-in whose optional dependency is missing
                raise RewardError(f"reward {name!r} needs a package that is not installed: {e}") from e
            raise RewardError(f"cannot import module {where!r} for reward {name!r}: {e}") from e
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise RewardError(f"{where} has no attribute {cls_name!r} (from spec {name!r})")
    if not (inspect.isclass(cls) and issubclass(cls, RewardModel)):
        raise RewardError(f"{name!r} is not a rewards.RewardModel subclass (got {cls!r}); subclass "
                          f"marval_rl.rewards.RewardModel and implement score(images, prompts, metadata)")
    return cls


def build_reward(spec: str | dict | RewardModel, base_dir: str | Path | None = None, **kwargs: Any) -> RewardModel:
    """Build a ready (frozen, eval-mode) reward from a spec.

    ``spec``: a name (see :data:`REWARDS`), ``"pkg.module:Class"``, ``"path/to/file.py:Class"``, a dict
    ``{"name": ..., "kwargs": {...}}`` (as in a recipe's reward list), or an already built reward (returned
    as is). ``kwargs`` override the dict's ``kwargs``. ``base_dir`` resolves relative file paths in names.
    """
    if isinstance(spec, RewardModel):
        if kwargs:
            raise RewardError("kwargs given with an already built reward")
        return spec
    if isinstance(spec, dict):
        unknown = set(spec) - SPEC_KEYS
        if unknown:
            raise RewardError(f"reward spec has unknown key(s) {sorted(unknown)}; valid keys: {sorted(SPEC_KEYS)}")
        if "name" not in spec:
            raise RewardError(f"reward spec {spec!r} has no 'name'")
        spec_kwargs = spec.get("kwargs") or {}
        if not isinstance(spec_kwargs, dict):
            raise RewardError(f"reward spec 'kwargs' must be a mapping, got {spec_kwargs!r}")
        name, kwargs = spec["name"], {**spec_kwargs, **kwargs}
    elif isinstance(spec, str):
        name = spec
    else:
        raise RewardError(f"a reward spec is a name or a dict, got {type(spec).__name__}")
    cls = resolve_reward_class(name, base_dir)
    if cls.__name__ == "CompositeReward" and base_dir is not None:
        kwargs.setdefault("base_dir", base_dir)
    try:
        reward = cls(**kwargs)
    except RewardError:
        raise
    except TypeError as e:
        try:
            params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        except (TypeError, ValueError):
            params = []
        raise RewardError(f"cannot build reward {name!r} with kwargs {sorted(kwargs)}: {e}"
                          + (f" (accepted: {params})" if params else "")) from e
    except (FileNotFoundError, OSError) as e:
        raise RewardError(f"cannot build reward {name!r}: {e}") from e
    if not isinstance(reward, RewardModel):
        raise RewardError(f"{name!r} did not produce a RewardModel")
    if reward.frozen:
        reward.freeze()
    return reward
