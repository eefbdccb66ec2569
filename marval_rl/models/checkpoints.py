"""Loading and saving weights: official MAR / KL-16 files, and the project's own safetensors format.

Safety: pickled checkpoints are read with ``torch.load(weights_only=True)``; the only non-tensor
object official files may carry (``argparse.Namespace`` under ``args``) is allow-listed. A file that
would execute code when unpickled is refused with :class:`CheckpointError`.
Strictness: a state dict is compared with the model *before* anything is copied, so a checkpoint of
another architecture gives one error listing missing / unexpected keys and shape mismatches and
never leaves a half-loaded model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from marval_rl import strict_json
from marval_rl.models.architectures import ARCHITECTURES, architecture_name

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model."""


def _first_line(e: BaseException) -> str:
    """``Type: first non-empty line`` of an exception (just the type when the message is empty)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _check_map_location(map_location, what) -> None:
    """A CUDA / MPS target on a machine without one: say so (torch's own error reads like a bad file)."""
    try:
        kind = torch.device(map_location).type
    except (RuntimeError, TypeError, ValueError):
        raise CheckpointError(f"cannot load {what}: unknown device {map_location!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"cannot load {what} to {map_location}: this machine has no CUDA GPU "
                              f"(torch.cuda.is_available() is False)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CheckpointError(f"cannot load {what} to {map_location}: MPS is not available here")


DIGEST_KEY = "marval_rl_blake2b"   # safetensors metadata: the digest of every tensor's name, dtype, shape, bytes


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of a state dict (names sorted; dtype, shape and raw bytes of each tensor). safetensors has no
    checksum of its own, so one flipped bit in a weights file would load silently without this."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def check_zip_crc(path: Path) -> None:
    """torch.save's zip stores a CRC32 of every record, which torch.load never checks: a flipped bit in a
    training state would resume silently. Verify them (one read of the file) before loading."""
    if not zipfile.is_zipfile(path):
        return          # a legacy (non-zip) torch file: nothing to verify, torch.load reads it as before
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"could not read checkpoint {path}: the file is truncated or corrupt "
                              f"({_first_line(e)})") from e
    if bad is not None:
        raise CheckpointError(f"could not read checkpoint {path}: its record {bad} fails its CRC check: the "
                              f"file is corrupt (damaged on disk or in a copy); use another copy or an earlier state")


def torch_load_safely(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (a marval-rl checkpoint directory "
                              f"loads with load_pretrained; an official checkpoint is the .pth file itself)")
    if not path.is_file():
        if path.exists():   # a FIFO, a device (/dev/zero): reading it would block or never end
            raise CheckpointError(f"{path} exists but is not a regular file (a pipe or a device?), not a checkpoint")
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"could not read checkpoint {path}: the file is empty (0 bytes; an interrupted "
                              f"download or copy?)")
    _check_map_location(map_location, path)
    check_zip_crc(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        forbidden = re.search(r"GLOBAL ([\w.]+)", text)
        if forbidden:  # a real pickle naming a global outside the allow-list: loading it could run code
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled objects outside the allow-list "
                f"({forbidden.group(1)}), which could run code when loaded. If you trust this file, re-save its "
                f"state dict with plain tensors.") from e
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        raise CheckpointError(f"could not read checkpoint {path}: the file is truncated, corrupt or not a "
                              f"PyTorch checkpoint ({reason.group(1).strip() if reason else _first_line(e)})") from e
    except Exception as e:  # zip / pickle / storage errors of a damaged or foreign file
        raise CheckpointError(f"could not read checkpoint {path}: the file is truncated, corrupt or not "
                              f"a PyTorch checkpoint ({_first_line(e)})") from e


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                     max_listed: int = 12) -> None:
    """Raise CheckpointError unless ``state_dict`` has exactly the model's keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or mismatched):
        return

    def listing(name, items):
        if not items:
            return ""
        more = f" ... (+{len(items) - max_listed} more)" if len(items) > max_listed else ""
        return f"\n  {name} ({len(items)}): " + ", ".join(items[:max_listed]) + more

    raise CheckpointError(
        f"{source} does not fit {type(model).__name__} (is it a checkpoint of another architecture "
        f"or size?)" + listing("missing keys", missing) + listing("unexpected keys", unexpected)
        + listing("shape mismatches", mismatched))


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model


def build_and_load(build: Callable[[], nn.Module], state_dict: dict, source: str,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """``build()`` on the meta device (no random init: MAR-H loads without one), the state dict checked
    against it before anything is copied (one error listing every mismatch), then materialised on
    ``device`` and loaded strictly. Returns the model in eval mode."""
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state_dict, source)
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:   # NaN weights sample NaN images, or crash a linear-algebra kernel downstream
        raise CheckpointError(f"{source} holds non-finite (NaN/Inf) weights in {len(bad)} tensor(s), e.g. {bad[0]}")
    model = model.to_empty(device=device)
    if dtype is not None:
        model = model.to(dtype)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- official files
def load_official_mar(checkpoint_path: str | os.PathLike, config, ema: bool = True,
                      map_location: str | torch.device = "cpu"):
    """Load an official MAR ``checkpoint-last.pth``.

    ``config``: the official constructor-argument dict, a :class:`MARConfig`, or a factory name
    ("mar_base", "mar_large", "mar_huge"). Loads ``model_ema`` (what evaluation uses) unless
    ``ema=False``, which loads ``model``. Returns the model in eval mode.
    """
    from marval_rl.models.mar import MAR

    ckpt = torch_load_safely(checkpoint_path, map_location)
    entry = "model_ema" if ema else "model"
    if not isinstance(ckpt, dict) or entry not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{checkpoint_path} has no '{entry}' entry (found {keys}); "
                              f"is it an official MAR checkpoint?")
    return build_and_load(lambda: MAR(config), ckpt[entry], f"{checkpoint_path}['{entry}']", map_location)


def load_official_vae(checkpoint_path: str | os.PathLike, config=None,
                      map_location: str | torch.device = "cpu"):
    """Load the official KL-16 VAE (``kl16.ckpt``: the state dict under ``'model'``), strictly.

    ``config``: a VAEConfig or dict; default the official KL-16 architecture. LDM training-loss
    weights (keys under ``loss.``), which some LDM checkpoints carry, are dropped; nothing else is.
    """
    from marval_rl.models.vae import AutoencoderKL, VAEConfig, kl16_config

    ckpt = torch_load_safely(checkpoint_path, map_location)
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{checkpoint_path} holds no state dict")
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    if config is None:
        config = kl16_config()
    elif isinstance(config, dict):
        config = VAEConfig.from_dict(config)
    return build_and_load(lambda: AutoencoderKL(config), sd, str(checkpoint_path), map_location)


# --------------------------------------------------------------------------- our own format
def architecture_of(model: nn.Module) -> str:
    name = architecture_name(model)
    if name is None:
        raise CheckpointError(f"no registered architecture for {type(model).__name__} (decorate its class with "
                              f"@marval_rl.models.architectures.register_architecture('name'))")
    return name


TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temp file in the same directory, fsync, rename: readers see the old file or the
    new one, never half of one, also after a power loss (the directory entry is synced too).

    A write killed mid-way (SIGKILL) leaves its temp file ``.NAME.XXXXXXXX.tmp``; the next run removes
    it (:func:`remove_stale_temps`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform without directory fds: the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files of killed :func:`atomic_write` calls under ``directory`` (call at start,
    before anything writes there); returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.rglob(f".*{TEMP_SUFFIX}"):
        # only our own pattern: ".<target name>.<8 random chars>.tmp", a regular file
        stem = p.name[1:-len(TEMP_SUFFIX)]
        target, _, rand = stem.rpartition(".")
        if target and len(rand) == 8 and p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed


def save_pretrained(model: nn.Module, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (architecture, config, metadata) atomically."""
    directory = Path(directory)
    arch = architecture_of(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors",
                 lambda p: save_file(tensors, p, metadata={DIGEST_KEY: tensors_digest(tensors)}))
    doc = {"format_version": FORMAT_VERSION, "architecture": arch,
           "config": model.checkpoint_config() if hasattr(model, "checkpoint_config") else model.config.to_dict(),
           "metadata": metadata or {}}
    atomic_write(directory / "config.json", lambda p: Path(p).write_text(strict_json.dumps(doc, indent=1)))
    return directory


def read_pretrained_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not directory.exists():
        raise CheckpointError(f"checkpoint not found: {directory}")
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not a marval-rl checkpoint directory (no config.json)")
    try:
        doc = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or "architecture" not in doc or "config" not in doc:
        raise CheckpointError(f"{cfg_path} lacks 'architecture'/'config'")
    version = doc.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {version!r} is newer than this marval-rl reads "
                              f"({FORMAT_VERSION}); upgrade marval-rl")
    return doc


def load_pretrained(directory: str | os.PathLike, expected: str | None = None,
                    map_location: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a directory written by :func:`save_pretrained`; ``expected`` names the architecture wanted.

    ``dtype``: the floating-point dtype of the loaded model. None builds it in float32 whatever the
    file stores (a float16-stored file loads as float32); give e.g. ``torch.bfloat16`` or
    ``torch.float64`` to load a model saved in that dtype bit for bit."""
    directory = Path(directory)
    doc = read_pretrained_config(directory)
    arch = doc["architecture"]
    if expected is not None and arch != expected:
        raise CheckpointError(f"{directory} holds a '{arch}' checkpoint, but a '{expected}' is expected here")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{directory}: unknown architecture '{arch}' (known: {sorted(ARCHITECTURES)}; "
                              f"a class of your own registers when its module is imported)")
    cls = ARCHITECTURES[arch]
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights}")
    _check_map_location(map_location, weights)
    try:
        with safe_open(str(weights), framework="pt") as f:
            digest = (f.metadata() or {}).get(DIGEST_KEY)
        sd = load_file(str(weights), device="cpu" if digest else str(map_location))
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"could not read {weights}: truncated or corrupt ({_first_line(e)})") from e
    if digest:   # written by save_pretrained: verify (files from elsewhere, or older ones, carry none)
        if tensors_digest(sd) != digest:
            raise CheckpointError(f"could not read {weights}: its tensors do not match the digest saved with them: "
                                  f"the file is corrupt (damaged on disk or in a copy)")
        sd = {k: v.to(map_location) for k, v in sd.items()} if str(map_location) != "cpu" else sd
    try:
        config = cls.config_class.from_dict(doc["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: its config does not fit a '{arch}' "
                              f"({_first_line(e)})") from e
    return build_and_load(lambda: cls(config), sd, str(weights), map_location, dtype)
