"""User code named by a recipe: ``path/to/file.py:Name``, loaded from exactly that file (nothing scanned)."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path


def load_file_module(path: str | Path, prefix: str = "marval_user"):
    """Import the Python file at ``path`` under a private module name (once per path)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"Python file not found: {path}")
    key = f"{prefix}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_{path.stem.replace('-', '_')}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load Python file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[key]
        hint = ""
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "rewards":
            hint = " (the reward interface is imported as `from marval_rl.rewards import RewardModel`)"
        raise ImportError(f"importing {path} failed: {type(e).__name__}: {e}{hint}") from e
    return module


def load_file_object(spec: str, what: str = "object"):
    """``"path/file.py:Name"`` -> the object ``Name`` of that file; ValueError naming the problem otherwise."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"{what} {spec!r}: give it as 'path/to/file.py:Name'")
    try:
        module = load_file_module(where)
    except (FileNotFoundError, ImportError) as e:
        raise ValueError(f"{what} {spec!r}: {e}") from e
    if not hasattr(module, name):
        raise ValueError(f"{what} {spec!r}: {where} has no attribute {name!r}")
    return getattr(module, name)
