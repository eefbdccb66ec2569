"""Weights by name: one table of the released files the recipes use, ``download`` and ``resolve``.

* :data:`WEIGHTS` (weights_table.py) — name -> Hugging Face repo, files, pinned revision, licence, what it is, which
  loader / recipe key takes it (``docs/weights.md`` is the same table).
* :func:`download` — ``marval-rl download NAME... [--dir DIR]``: fetch table names or hub ids
  (``org/repo`` or ``org/repo/path/in/repo``) through ``huggingface_hub`` into its cache (``HF_HOME`` /
  ``HF_HUB_CACHE``) or, with ``dir``, into ``DIR/<the recipes' layout>`` (``pretrained_models/...``).
* :func:`resolve` — what every loader calls on a path argument: a local path is returned as given; a
  table name or a hub id is looked up in the local Hugging Face cache *only* (never the network, whatever
  ``HF_HUB_OFFLINE`` says: loaders run in every Ray worker and torchrun rank, and multi-GB downloads are
  an explicit step); when it is nowhere, :class:`HubError` says in one line which command fetches it.

Low level on purpose: imports nothing of ``marval_rl.rewards`` or ``marval_rl.rl``.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from marval_rl.weights_table import WEIGHTS, Weights, format_table, table_rows  # noqa: F401  (re-exported)

__all__ = ["Weights", "WEIGHTS", "HubError", "resolve", "download", "cache_dir", "is_offline", "table_rows",
           "format_table", "parse_hub_id", "fetch_command", "fetch_hint", "OPEN_CLIP_FILES"]


class HubError(ValueError):
    """A named or hub-id weight that is not available locally, or a download that failed (one line)."""


OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HUB_ID = re.compile(r"^(?P<org>[A-Za-z0-9][\w.-]*)/(?P<repo>[\w.-]+?)(?:@(?P<rev>[\w.-]+))?(?:/(?P<path>.+))?$")


# ------------------------------------------------------------------------------------------ environment
def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set *now* (huggingface_hub reads it at import)."""
    return _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub computes it, from the environment as it is *now*:
    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache`` + ``huggingface/hub``."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


# ------------------------------------------------------------------------------------------ parsing
@dataclass
class _Target:
    """What a spec names on the hub: repo, revision, file candidates (empty = the folder)."""
    repo_id: str
    revision: str | None
    filenames: tuple[str, ...]
    entry: Weights | None = None
    command: str = ""


def parse_hub_id(spec: str) -> tuple[str, str | None, str | None] | None:
    """``org/repo[@rev][/path]`` -> (repo_id, revision, path) or None when it is not shaped like one."""
    if not isinstance(spec, str) or spec.startswith(("/", "./", "../", "~", "\\")) or "\\" in spec or "//" in spec:
        return None
    m = _HUB_ID.match(spec)
    if not m or m.group("repo").endswith((".", "-")) or ".." in m.group("repo"):
        return None
    return f"{m.group('org')}/{m.group('repo')}", m.group("rev"), m.group("path")


def _candidates(filename: str | Sequence[str] | None) -> tuple[str, ...]:
    if filename is None:
        return ()
    return (filename,) if isinstance(filename, str) else tuple(filename)


def _target(spec: str, filename: str | Sequence[str] | None) -> _Target | None:
    wanted = _candidates(filename)
    entry = WEIGHTS.get(spec)
    if entry is not None:
        if entry.is_folder:
            files = tuple(f for f in wanted if f)  # a file inside the folder, or the folder itself
        else:
            files = tuple(f for f in wanted if f in entry.files) or \
                (entry.files[:1] if len(entry.files) == 1 or not wanted else ())
            if not files:
                raise HubError(f"'{spec}' holds {', '.join(entry.files)}, not {' or '.join(wanted)}")
        return _Target(entry.repo_id, entry.revision, files, entry, f"marval-rl download {spec}")
    parsed = parse_hub_id(spec)
    if parsed is None:
        return None
    repo_id, rev, path = parsed
    files = (path,) if path else wanted
    fetch = spec if path or not files else f"{spec}/{files[0]}"
    return _Target(repo_id, rev, files, None, f"marval-rl download {fetch}")


def _layout_hint(spec: str) -> str | None:
    """``marval-rl download NAME --dir PREFIX`` when ``spec`` is where ``--dir PREFIX`` would put NAME."""
    found = _layout_match(spec)
    return found[0] if found else None


def _layout_match(spec: str) -> tuple[str, str] | None:
    """(the ``--dir`` download command, a note) for a path in the recipes' layout, else None. The note is
    for an official MAR file the hub does not have (``mar/mar_large/checkpoint-last.pth``, the EMA file):
    the download in that folder is the non-EMA conversion, under its own name."""
    parts = Path(spec).expanduser().parts
    for entry in WEIGHTS.values():
        sub = tuple(Path(entry.local_dir).parts)
        for tail in ([()] if entry.is_folder else []) + [(entry.local_name(f),) for f in entry.files]:
            want = sub + tail
            if len(parts) >= len(want) and parts[-len(want):] == want:
                return f"marval-rl download {entry.name} --dir {Path(*parts[:-len(want)] or ['.'])}", ""
            if entry.is_folder and len(parts) > len(sub) and parts[-len(sub) - 1:-1] == sub:
                return f"marval-rl download {entry.name} --dir {Path(*parts[:-len(sub) - 1] or ['.'])}", ""
        if (not entry.is_folder and sub[:1] == ("mar",) and len(parts) > len(sub)
                and parts[-len(sub) - 1:-1] == sub and parts[-1] == "checkpoint-last.pth"):
            prefix = Path(*parts[:-len(sub) - 1] or ["."])
            written = prefix.joinpath(*sub, entry.local_name(entry.files[0]))
            return (f"marval-rl download {entry.name} --dir {prefix}",
                    f"it writes the hub's non-EMA conversion {written}, so name that file; the EMA "
                    f"checkpoint-last.pth is on Dropbox only: LTH14/mar README, docs/weights.md")
    return None


def fetch_hint(spec: str | os.PathLike | None, filename: str | Sequence[str] | None = None) -> str:
    """``"; fetch it with `marval-rl download ...`"`` (or ``"; make it with `marval-rl distill ...`"`` for
    what a marval-rl command writes, run_outputs.py) for a loader's not-found message, or ``""``."""
    if not spec:
        return ""
    from marval_rl.run_outputs import making_command

    making = making_command(os.fspath(spec))
    if making is not None:
        return f"; {making.hint()}"
    layout = _layout_match(os.fspath(spec))
    if layout:
        return f"; fetch it with `{layout[0]}`" + (f" ({layout[1]})" if layout[1] else "")
    command = fetch_command(os.fspath(spec), filename)
    return f"; fetch it with `{command}`" if command else ""


def fetch_command(spec: str, filename: str | Sequence[str] | None = None) -> str | None:
    """The command that would put ``spec`` where a loader looks for it, or None if no command can: the
    marval-rl command that writes it (run_outputs.py), else the ``marval-rl download`` that fetches it."""
    from marval_rl.run_outputs import making_command

    making = making_command(str(spec))
    if making is not None:
        return making.command
    hint = _layout_hint(str(spec))
    if hint:
        return hint
    try:
        t = _target(str(spec), filename)
    except HubError:
        return None
    return t.command if t else None


# ------------------------------------------------------------------------------------------ resolve
def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """``snapshots/<commit>`` of ``repo_id`` at ``revision`` (a ref such as main, or a commit), as
    ``try_to_load_from_cache`` finds files. Not ``snapshot_download(local_files_only=True)``: that refuses
    a snapshot fetched with allow-patterns (IncompleteSnapshotError), which is what a folder entry is."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    rev = revision or "main"
    ref = repo / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snap = repo / "snapshots" / commit
    return snap if snap.is_dir() and any(snap.iterdir()) else None


def _cached_file(repo_id: str, filename: str, revision: str | None, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache), revision=revision)
    except ValueError:
        return None
    return Path(found) if isinstance(found, str) else None


def resolve(spec: str | os.PathLike, filename: str | Sequence[str] | None = None) -> str:
    """A local path for ``spec``, from the local disk or the local Hugging Face cache only.

    ``spec``: a local file / folder (returned exactly as given, also when it does not exist but is written
    as a path: ``/abs``, ``./rel``, ``~/x``, or a single name, so loaders keep their own messages), a name in
    :data:`WEIGHTS`, or a hub id ``org/repo``, ``org/repo/path/in/repo`` (``org/repo@REV/...`` pins a
    revision). ``filename``: the file a loader wants when the spec names a repo (a string or candidates in
    order of preference); None asks for the repo's folder (a ``transformers`` model folder).
    Raises :class:`HubError` (one line: the spec and the ``marval-rl download ...`` that fetches it).
    """
    if spec is None or str(spec) == "":
        raise HubError("empty weights spec: give a local path, a name (marval-rl download --list) or org/repo")
    spec_s = os.fspath(spec)
    if Path(spec_s).expanduser().exists():
        return spec_s
    target = _target(spec_s, filename)
    if target is None:
        return spec_s  # a path that does not exist: the loader reports it
    cache = cache_dir()
    if target.filenames:
        for f in target.filenames:
            found = _cached_file(target.repo_id, f, target.revision, cache)
            if found is not None:
                return str(found)
    else:
        found = _cached_snapshot(target.repo_id, target.revision, cache)
        if found is not None:
            return str(found)
    what = f"{target.repo_id}/{' or '.join(target.filenames)}" if target.filenames else target.repo_id
    rev = f"@{target.revision[:10]}" if target.revision else ""
    if target.entry is not None:
        raise HubError(f"'{spec_s}' ({what}{rev}) is not in the Hugging Face cache ({cache}); "
                       f"fetch it with `{target.command}`")
    from marval_rl.run_outputs import making_command

    if making_command(spec_s) is not None or _layout_match(spec_s):   # a path, not a hub id
        raise HubError(f"'{spec_s}' does not exist{fetch_hint(spec_s)}")
    raise HubError(f"'{spec_s}' not found: no such local file or folder, and not in the Hugging Face cache ({cache}) "
                   f"as a hub id; if it is one, fetch it with `{target.command}`")


# ------------------------------------------------------------------------------------------ download
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _known() -> str:
    return ", ".join(WEIGHTS)


def _parse_names(names: Iterable[str]) -> list[tuple[str, Weights | None, tuple[str, str | None, str | None] | None]]:
    names = list(names)
    if not names:
        raise HubError(f"name at least one weight to download; known names: {_known()} (or a hub id org/repo[/file])")
    out, unknown = [], []
    for n in names:
        entry, parsed = WEIGHTS.get(n), None if n in WEIGHTS else parse_hub_id(n)
        if entry is None and parsed is None:
            unknown.append(n)
        out.append((n, entry, parsed))
    if unknown:
        raise HubError(f"unknown weights {', '.join(repr(u) for u in unknown)}; known names: {_known()} "
                       f"(or a hub id org/repo[/file])")
    return out


def _hub_error(what: str, e: Exception) -> HubError:
    first = (str(e).strip().splitlines() or [""])[0]
    return HubError(f"could not download {what}: {type(e).__name__}: {first}")


def _pick_weights(entry: Weights) -> list[str]:
    if not entry.weights_any:
        return []
    from huggingface_hub import HfApi

    files = set(HfApi().list_repo_files(entry.repo_id, revision=entry.revision))
    for f in entry.weights_any:
        if f in files:
            return [f]
    raise HubError(f"{entry.repo_id} has none of {', '.join(entry.weights_any)}")


def _download_entry(entry: Weights, dest: Path | None, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    local = dest / entry.local_dir if dest is not None else None
    kw = dict(revision=entry.revision, cache_dir=None if local else str(cache), local_dir=str(local) if local else None)
    if entry.is_folder:
        patterns = list(entry.patterns) + _pick_weights(entry)
        return Path(snapshot_download(entry.repo_id, allow_patterns=patterns, **kw))
    paths = []
    for f in entry.files:
        renamed = local / entry.local_name(f) if local is not None and entry.local_name(f) != f else None
        if renamed is not None and renamed.is_file():  # fetched before (and renamed): delete it to re-fetch
            paths.append(renamed)
            continue
        p = Path(hf_hub_download(entry.repo_id, f, **kw))
        want = dict(entry.sha256).get(f)
        if want:
            got = _sha256(p)
            if got != want:
                real = p.resolve()
                p.unlink()
                real.unlink(missing_ok=True)  # the cache blob, so that resolve() never finds this file
                raise HubError(f"{entry.repo_id}/{f}: sha256 {got} is not the table's {want} (the file changed "
                               f"upstream, or the table is wrong); the file was removed")
        if renamed is not None:
            os.replace(p, renamed)
            p = renamed
        paths.append(p)
    return paths[0] if len(paths) == 1 else paths[0].parent


def _offline_check(name: str, entry: Weights | None, hub, dest: Path | None) -> Path:
    """Offline: what is already there (the --dir layout or the cache), else a one-line error."""
    if dest is not None:
        if entry is not None:
            base = dest / entry.local_dir
            there = [base / entry.local_name(f) for f in entry.files] or [base]
        else:
            base = dest / hub[0].split("/")[1]
            there = [base / hub[2]] if hub[2] else [base]
        if all(p.exists() for p in there):
            return there[0] if len(there) == 1 else base
        where = str(base)
    else:
        files = entry.files if entry is not None and len(entry.files) > 1 else (None,)
        try:
            paths = [Path(resolve(name, f)) for f in files]
            return paths[0] if len(paths) == 1 else paths[0].parent
        except HubError:
            where = f"the Hugging Face cache ({cache_dir()})"
    raise HubError(f"cannot download '{name}': HF_HUB_OFFLINE is set and it is not in {where}; unset "
                   f"HF_HUB_OFFLINE, or run `marval-rl download {name}` where there is network and copy the cache")


def download(names: Iterable[str], dir: str | os.PathLike | None = None) -> list[Path]:
    """Fetch weights by table name or hub id; returns one local path (file or folder) per name.

    Without ``dir`` the files go to the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), where
    :func:`resolve` and so every loader finds them by name offline. With ``dir`` they go to
    ``dir/<entry.local_dir>/`` — the layout the shipped recipes name (``--dir pretrained_models``).
    Under ``HF_HUB_OFFLINE=1`` nothing is fetched: what is already there is returned, anything else is a
    :class:`HubError`. Pinned files are checked against the table's sha256.
    """
    parsed = _parse_names(names)
    dest = Path(dir).expanduser() if dir is not None else None
    cache = cache_dir()
    out: list[Path] = []
    for name, entry, hub in parsed:
        if is_offline():
            out.append(_offline_check(name, entry, hub, dest))
            continue
        from huggingface_hub import hf_hub_download, snapshot_download

        try:
            if entry is not None:
                out.append(_download_entry(entry, dest, cache))
                continue
            repo_id, rev, path = hub
            local = str(dest / repo_id.split("/")[1]) if dest is not None else None
            kw = dict(revision=rev, cache_dir=None if local else str(cache), local_dir=local)
            out.append(Path(hf_hub_download(repo_id, path, **kw) if path else snapshot_download(repo_id, **kw)))
        except HubError:
            raise
        except Exception as e:  # network, 404, auth: one line naming what failed
            raise _hub_error(name if entry is None else f"{name} ({entry.repo_id})", e) from e
    return out
