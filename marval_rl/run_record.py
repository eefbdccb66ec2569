"""Run records: every output folder says what made it, and a re-run resumes only the same run.

``OUTPUT_DIR/recipe.yaml`` is the resolved recipe of the command that wrote the folder, and
``OUTPUT_DIR/run.json`` the command, the package version and when it started. Re-running into a folder
that holds a training state resumes it only when the recipe matches, except for the keys in
:data:`MAY_DIFFER_ON_RESUME` (how long to run, how often to log, where to run: nothing that changes a
number); otherwise it stops, naming the keys that differ. ``--overwrite`` starts afresh (the previous
run's files are removed) and ``--resume PATH`` continues the state in PATH.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from marval_rl import strict_json
from marval_rl.config import RecipeError, recipe_to_yaml
from marval_rl.models.checkpoints import atomic_write

RECIPE_FILE, RUN_FILE, LOCK_FILE = "recipe.yaml", "run.json", ".marval-rl.lock"

# The keys a resumed run may change: run length, logging and placement. Anything else (seeds, sizes,
# rewards, learning rates, worker counts: they decide the requests and the numbers) must match.
MAY_DIFFER_ON_RESUME = (
    "output_dir",
    "train.iterations", "train.checkpoint_every", "train.grid_every", "train.eval_every", "train.wandb",
    "train.use_ray", "train.ray_address", "train.dashboard_host", "train.dashboard_port", "train.worker_threads",
    "distill.generator_optim.steps", "distill.fake_optim.steps", "distill.log_every", "distill.sample_every",
    "distill.checkpoint_every",
    "pretrain.stages", "pretrain.log_every", "pretrain.sample_every", "pretrain.checkpoint_every",
    "pretrain.vae.optim.steps", "pretrain.mar.optim.steps",
    "sample.grid_nrow",
)

# per command: the state files it resumes from, then everything else it writes (what --overwrite removes)
OUTPUTS = {
    "train": (["rl_state.pt"], ["metrics.jsonl", "summary.json", "report.html", "reward_curve.png",
                                "before_after.png", "eval", "grids", "policy", "prometheus.yml", "wandb"]),
    "distill": (["distill_train_state.pt"], ["distill_metrics.jsonl", "samples", "student"]),
    "pretrain": (["vae_train_state.pt", "mar_train_state.pt", "classifier_train_state.pt", "clip_train_state.pt"],
                 ["vae_metrics.jsonl", "mar_metrics.jsonl", "classifier_metrics.jsonl", "clip_metrics.jsonl",
                  "samples", "vae", "teacher"]),
    # evaluate writes into OUTPUT_DIR/evaluate (eval/sharded.py), beside whatever made OUTPUT_DIR
    "evaluate": (["eval_progress.json"], ["chunks", "evaluate.json", "eval_inputs.json"]),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("marval-rl")
    except PackageNotFoundError:
        return "unknown"


def flatten(recipe) -> dict:
    """``{"train.optim.lr": 0.002, ...}`` of a recipe dataclass (lists and dicts as values)."""
    out: dict = {}

    def walk(prefix: str, node):
        if isinstance(node, dict) and not (prefix.endswith(("config", "kwargs", "group_lr"))):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node
    walk("", OmegaConf.to_container(OmegaConf.structured(recipe)))
    return out


def differing_keys(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k) and not k.startswith(MAY_DIFFER_ON_RESUME)]


def has_state(out: Path, command: str) -> Path | None:
    for name in OUTPUTS.get(command, ([], []))[0]:
        if (out / name).is_file():
            return out / name
    return None


def resume_source(path: str | Path, command: str) -> Path:
    """The state file that ``--resume PATH`` names: the file itself or the one in a run's folder."""
    path = Path(path)
    if path.is_file():
        return path
    state = has_state(path, command) if path.is_dir() else None
    if state is None:
        names = " or ".join(OUTPUTS.get(command, ([], []))[0])
        raise RecipeError(f"--resume {path}: no {command} state there (expected {names} or a folder holding it)")
    return state


def check_resume(out: Path, recipe, command: str, state: Path | None = None) -> str:
    """'fresh' | 'resume'. Raises RecipeError when ``out`` (or the folder of ``state``, from ``--resume``)
    holds another recipe's run, or a run of another command."""
    check_foreign_run(out, command)
    state = state if state is not None else has_state(out, command)
    if state is None:
        return "fresh"
    explicit = state is not None and state != has_state(out, command)
    out = state.parent
    stored = out / RECIPE_FILE
    if not stored.is_file() and explicit:   # --resume PATH: the user named this state
        print(f"[{command}] note: {state} has no {RECIPE_FILE} beside it; resuming it without a recipe check")
        return "resume"
    if not stored.is_file():
        raise RecipeError(f"{out} holds a training state ({state.name}) but no {RECIPE_FILE}, so it cannot be "
                          f"checked against this recipe; pass --overwrite to start afresh or --resume {state} "
                          f"to continue it anyway")
    old = flatten(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(type(recipe)), OmegaConf.load(stored))))
    diff = differing_keys(old, flatten(recipe))
    if diff:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {flatten(recipe).get(k)!r})" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise RecipeError(f"{out} holds a run of another recipe ({shown}{more} differ): use another output_dir, "
                          f"--overwrite to start afresh there, or the same settings to resume it")
    return "resume"


def recorded_command(out: Path) -> str | None:
    """The command whose run record (``run.json``) ``out`` holds, or None."""
    try:
        return json.loads((Path(out) / RUN_FILE).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def check_foreign_run(out: Path, command: str) -> None:
    """``out`` holds a run of another command (a `train` folder given to `sample`): refuse, so that
    neither run's record is overwritten nor its files mixed."""
    other = recorded_command(out)
    if other is not None and other != command:
        raise RecipeError(f"output_dir {out} holds a `marval-rl {other}` run (its {RUN_FILE}); give `{command}` "
                          f"another output_dir")


def overwrite(out: Path, command: str) -> list[Path]:
    """Remove what a previous run of ``command`` wrote to ``out`` (only the files it writes), and only
    when ``out`` holds that command's run record: a user's folder that happens to hold an ``eval/`` is
    never touched."""
    states, others = OUTPUTS.get(command, ([], []))
    if not any((out / n).exists() for n in [*states, *others, RECIPE_FILE, RUN_FILE]):
        return []
    if recorded_command(out) != command:
        raise RecipeError(f"--overwrite: {out} holds no `marval-rl {command}` run record ({RUN_FILE}), so it is not "
                          f"clear which files are a run's; remove them yourself or use another output_dir")
    removed = []
    for name in [*states, *others, RECIPE_FILE, RUN_FILE]:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(p)
    return removed


def write_run_record(out: Path, recipe, command: str) -> None:
    """``recipe.yaml`` (resolved) and ``run.json`` (command, version, start time) in ``out``."""
    out = Path(out)
    atomic_write(out / RECIPE_FILE, lambda p: Path(p).write_text(recipe_to_yaml(recipe)))
    record = {"command": command, "argv": sys.argv, "version": version(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write(out / RUN_FILE, lambda p: Path(p).write_text(strict_json.dumps(record, indent=1)))


@contextlib.contextmanager
def output_lock(out: str | Path, command: str):
    """Hold ``out`` for this run: a second run into the same folder (two shells, a sweep launched twice)
    stops with one line naming the first run's pid and start, instead of interleaving its metrics and
    overwriting its record. An OS file lock (flock on ``out/.marval-rl.lock``), released when the process
    ends however it ends, so a killed run never leaves a stale lock. Under torchrun rank 0 holds it.

    A run that fails before it saved any state leaves no folder it created (as if it never started)."""
    import fcntl

    out = Path(out)
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    created = out                      # the outermost folder this run makes (removed if it fails early)
    while not created.parent.exists():
        created = created.parent
    created = None if out.exists() else created
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        try:
            holder = json.loads(f.read() or "{}")
        except ValueError:
            holder = {}
        f.close()
        raise RecipeError(f"output_dir {out} is in use by another marval-rl run (pid {holder.get('pid', '?')}, "
                          f"`marval-rl {holder.get('command', '?')}` started {holder.get('started', '?')}); wait "
                          f"for it to end or use another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(strict_json.dumps({"pid": os.getpid(), "command": command,
                               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}))
    f.flush()
    try:
        yield
    except BaseException:
        if created is not None and has_state(out, command) is None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        f.close()
