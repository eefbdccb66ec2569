"""Evaluation's generation, sharded over ranks and resumable: a fixed list of (class, seed) items cut into
chunks, each chunk's per-image outputs saved atomically as it completes.

The item list is fixed by the recipe: item ``i`` has class ``classes[i % C]`` (class-balanced when the count
is a multiple of C) and lies in chunk ``i // chunk_size``; a chunk is generated in batches from its own
generator, seeded by :func:`chunk_seed`. So an image depends only on its chunk, never on the world size,
on which rank made it, or on an interruption: N ranks, one process, and a killed-then-resumed run compute
the same images and the same features (bit for bit on the same kernels).

Under torchrun the chunks still to do are dealt out in rounds, one per rank; each round's outputs are
gathered to rank 0, which alone writes ``chunks/chunk_NNNNN.safetensors`` (:func:`distributed.on_main`
rule). A rerun lists the chunk files and does only the rest; a killed write leaves only a temp file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from marval_rl import strict_json
from marval_rl import distributed
from marval_rl.models.checkpoints import atomic_write

CHUNK_DIR, PROGRESS_FILE, INPUTS_FILE = "chunks", "eval_progress.json", "eval_inputs.json"


def item_labels(classes: list[int], num_images: int) -> list[int]:
    """The class of every item, interleaved (``classes[i % C]``) so that any prefix is near-balanced."""
    return [int(classes[i % len(classes)]) for i in range(num_images)]


def chunk_bounds(num_images: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, num_images)) for s in range(0, num_images, chunk_size)]


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` (distinct chunks, distinct seeds; fits torch's 64-bit seed)."""
    return (int(seed) * 1_000_003 + int(chunk)) % (2 ** 63)


def inputs_fingerprint(paths: dict[str, str]) -> dict[str, list]:
    """key -> [[file, size, mtime_ns], ...] of the files under each path (a file, or a folder's files)."""
    out = {}
    for key, p in sorted(paths.items()):
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        out[key] = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return out


def check_inputs(out: Path, paths: dict[str, str]) -> None:
    """The first run records the files it scores with (weights, statistics); a rerun resumes only when they
    are unchanged: the recipe can name the same path after its file was replaced (a retrained student)."""
    from marval_rl.config import RecipeError

    now, path = inputs_fingerprint(paths), Path(out) / INPUTS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise RecipeError(f"{out} holds an evaluation made with other files under {', '.join(changed)} (changed "
                              f"since: size or modification time); pass --overwrite to evaluate afresh")
        return
    atomic_write(path, lambda p: Path(p).write_text(strict_json.dumps(now, indent=1)))


def chunk_path(out: Path, k: int) -> Path:
    return Path(out) / CHUNK_DIR / f"chunk_{k:05d}.safetensors"


def done_chunks(out: Path, num_chunks: int) -> list[int]:
    """Chunks whose file exists (written atomically: an existing file is a whole one)."""
    return [k for k in range(num_chunks) if chunk_path(out, k).is_file()]


def _save(out: Path, k: int, outputs: dict[str, torch.Tensor]) -> None:
    atomic_write(chunk_path(out, k), lambda p: save_file({n: t.contiguous() for n, t in outputs.items()}, p))


def run_chunks(out: Path, num_chunks: int, compute: Callable[[int], dict[str, torch.Tensor]],
               log: Callable[[str], None] = print) -> int:
    """Compute every chunk not yet on disk (``compute(k)`` -> named CPU tensors, first dim = the chunk's
    images), this rank's share of each round, and save them on rank 0. Returns how many chunks this
    call computed over all ranks."""
    out = Path(out)
    todo = distributed.broadcast_object([k for k in range(num_chunks) if not chunk_path(out, k).is_file()])
    size, me = distributed.world_size(), distributed.rank()
    if distributed.is_main() and len(todo) < num_chunks:
        log(f"[evaluate] resuming: {num_chunks - len(todo)} of {num_chunks} chunks are done in {out / CHUNK_DIR}")
    for start in range(0, len(todo), size):
        group = todo[start:start + size]
        mine = compute(group[me]) if me < len(group) else None
        gathered = distributed.all_gather_object(mine)
        if distributed.is_main():
            for k, outputs in zip(group, gathered):
                _save(out, k, outputs)
            done = num_chunks - len(todo) + start + len(group)
            atomic_write(out / PROGRESS_FILE, lambda p: Path(p).write_text(
                strict_json.dumps({"chunks_done": done, "num_chunks": num_chunks})))
            log(f"[evaluate] chunks {done}/{num_chunks}")
        distributed.barrier()
    return len(todo)


def load_chunks(out: Path, num_chunks: int) -> dict[str, torch.Tensor]:
    """Every chunk's outputs concatenated in item order."""
    parts = [load_file(str(chunk_path(out, k))) for k in range(num_chunks)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
