"""``marval-rl cache``: an image folder (ImageNet's ``train/``) -> one latent cache file, made the way MAR's
cache step makes it: the ADM centre crop to ``data.image_size``, the VAE posterior moments of every image
and of its horizontal flip, labels from the sorted class folders. Training then reads the file with
``data.source=latents`` (:class:`~marval_rl.data.sources.CachedLatentSource`), which refuses a cache made
by another VAE or at another image size (:func:`check_cache_fits`).

Sharded and resumable. The sorted file list is cut into chunks of ``chunk_size`` images; a chunk is
encoded in fixed batches of ``batch_size`` and written atomically as a part file in ``<cache_file>.parts/``.
Under torchrun the chunks not yet written are dealt round-robin over the ranks; a rerun skips every part
that exists and still matches its file list. Rank 0 then streams the parts, in order, into the one file and
removes the folder. A chunk's batches do not depend on which rank encodes it or when, so the file is bitwise
the same for any world size and any number of interruptions -- at the same torch thread count per process
(torchrun sets OMP_NUM_THREADS=1): a CPU's float sums change order with the thread count.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from marval_rl import distributed, strict_json
from marval_rl.models.checkpoints import atomic_write, remove_stale_temps
from .sources import (CachedLatentSource, ImageFolderSource, _tensor_layout, cache_metadata, center_crop_arr,
                      image_to_tensor, vae_fingerprint)

PART_FORMAT = "marval-rl-latent-part/1"
MANIFEST = "manifest.json"
DEFAULT_CHUNK_SIZE = 4096
DEFAULT_BATCH_SIZE = 64


# ---- what a cache is made of ------------------------------------------------------------------------------------
def files_digest(samples: list[tuple[str, int]], root: Path) -> str:
    """sha256 of a file list (paths relative to the folder, and labels): what a part or a cache was made from.
    Names, not contents: a broken image replaced under the same name keeps every other chunk valid."""
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}\t{int(label)}\n".encode())
    return h.hexdigest()


class CacheJob:
    """One cache to make: the sorted (path, label) list cut into chunks, and where each chunk's part lives."""

    def __init__(self, out: Path, root: Path, samples: list[tuple[str, int]], classes: list[str], image_size: int,
                 chunk_size: int, batch_size: int):
        self.out, self.root, self.samples, self.classes = Path(out), Path(root), samples, classes
        self.image_size, self.chunk_size, self.batch_size = image_size, chunk_size, batch_size
        self.parts_dir = self.out.with_name(self.out.name + ".parts")

    @property
    def num_chunks(self) -> int:
        return -(-len(self.samples) // self.chunk_size)

    def chunk_range(self, k: int) -> range:
        return range(k * self.chunk_size, min((k + 1) * self.chunk_size, len(self.samples)))

    def chunk_digest(self, k: int) -> str:
        r = self.chunk_range(k)
        return files_digest(self.samples[r.start:r.stop], self.root)

    def part_path(self, k: int) -> Path:
        return self.parts_dir / f"part-{k:06d}.safetensors"

    def part_done(self, k: int) -> bool:
        """The part exists (parts are written atomically: one that exists is whole) and holds this chunk's files."""
        path = self.part_path(k)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
        except Exception:  # noqa: BLE001  (unreadable: encode the chunk again)
            return False
        return meta.get("format") == PART_FORMAT and meta.get("chunk_sha256") == self.chunk_digest(k)


def job_settings(job: CacheJob, vae_sha256: str) -> dict:
    """What every part of one cache must share; a parts folder made with other settings is refused."""
    return {"format": PART_FORMAT, "vae_sha256": vae_sha256, "image_size": job.image_size,
            "chunk_size": job.chunk_size, "batch_size": job.batch_size}


# ---- encoding ---------------------------------------------------------------------------------------------------
class FolderImages(Dataset):
    """(image [3, S, S] in [-1, 1], label, error) per file: MAR's centre crop, no flip. A file that cannot be
    decoded gives a zero image and its error, so the other images of the run go on and the error names it."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int):
        self.samples, self.image_size = samples, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                x = image_to_tensor(center_crop_arr(im.convert("RGB"), self.image_size))
            return x, int(label), ""
        except Exception as e:  # noqa: BLE001  (PIL raises many kinds for a broken file)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return torch.zeros(3, self.image_size, self.image_size), int(label), f"{path}: {first}"


@torch.no_grad()
def encode_chunks(vae: torch.nn.Module, job: CacheJob, chunks: list[int], device, num_workers: int = 0,
                  progress: bool = True) -> list[str]:
    """Encode ``chunks`` and write one part per chunk; returns the errors of undecodable images (their chunks
    are not written, the others are)."""
    batches, owner = [], []          # fixed batches per chunk; owner[i] = (chunk, last batch of it?)
    for k in chunks:
        r = job.chunk_range(k)
        starts = list(range(r.start, r.stop, job.batch_size))
        for j, lo in enumerate(starts):
            batches.append(list(range(lo, min(lo + job.batch_size, r.stop))))
            owner.append((k, j == len(starts) - 1))
    if not batches:
        return []
    loader = DataLoader(FolderImages(job.samples, job.image_size), batch_sampler=batches, num_workers=num_workers)
    vae.eval()
    bad: list[str] = []
    moments, labels, errors = [], [], []
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"caching latents -> {job.out.name}", unit="img",
               disable=not (progress and distributed.is_main()))
    for (k, last), (x, y, err) in zip(owner, loader):
        errors += [e for e in err if e]
        if not errors:               # a chunk with a broken image is not written: no need to encode the rest
            x = x.to(device=device, dtype=torch.float32)
            moments.append(torch.stack([vae.encode(x).moments, vae.encode(x.flip(-1)).moments], 1).float().cpu())
            labels.append(y.to(torch.int64))
        bar.update(len(y))
        if last:
            if errors:
                bad += errors
            else:
                tensors = {"moments": torch.cat(moments).contiguous(), "labels": torch.cat(labels).contiguous()}
                meta = {"format": PART_FORMAT, "chunk": str(k), "chunk_sha256": job.chunk_digest(k)}
                atomic_write(job.part_path(k), lambda tmp: save_file(tensors, tmp, metadata=meta))
            moments, labels, errors = [], [], []
    bar.close()
    return bad


# ---- the one file -----------------------------------------------------------------------------------------------
def write_cache_file(path: Path, parts: list[Path], metadata: dict[str, str]) -> int:
    """Stream ``parts`` (in order) into one safetensors file, atomically, without holding more than one part in
    memory (an ImageNet cache is 84 GB). The layout is the safetensors format (an 8-byte little-endian header
    length, the JSON header padded to 8 bytes, then each tensor's bytes), read back by the safetensors library.
    Returns the file's size in bytes."""
    shapes, count = [], 0
    for p in parts:
        header, _ = _tensor_layout(p)
        shapes.append(tuple(header["moments"]["shape"]))
        count += shapes[-1][0]
    row = shapes[0][1:]
    if any(s[1:] != row for s in shapes):
        raise ValueError(f"the parts in {parts[0].parent} hold latents of different shapes {sorted(set(shapes))}")
    m_bytes = count * 4 * int(torch.Size(row).numel())
    header = {"__metadata__": metadata,
              "moments": {"dtype": "F32", "shape": [count, *row], "data_offsets": [0, m_bytes]},
              "labels": {"dtype": "I64", "shape": [count], "data_offsets": [m_bytes, m_bytes + 8 * count]}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # 8-byte aligned data, as safetensors writes it

    def write(tmp: str) -> None:
        labels = []
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for p in parts:
                with safe_open(str(p), framework="pt") as fh:
                    f.write(fh.get_tensor("moments").to(torch.float32).contiguous().numpy().tobytes())
                    labels.append(fh.get_tensor("labels").to(torch.int64))
            f.write(torch.cat(labels).contiguous().numpy().astype("<i8").tobytes())

    atomic_write(path, write)
    return 8 + len(blob) + m_bytes + 8 * count


def check_cache_fits(cache: CachedLatentSource, vae: torch.nn.Module, image_size: int | None = None) -> None:
    """A cache is training data for one VAE at one image size: refuse one made by another VAE (its weights'
    fingerprint; a format-1 file, which has none, by the VAE's config) or at another ``image_size``."""
    hint = ("make one with this VAE: marval-rl cache RECIPE data.source=imagefolder data.root=IMAGES "
            "data.cache_file=FILE")
    if cache.vae_sha256:
        mine = vae_fingerprint(vae)
        if cache.vae_sha256 != mine:
            raise ValueError(f"latent cache {cache.path} was made by another VAE (weights sha256 "
                             f"{cache.vae_sha256[:12]}..., the recipe's vae.checkpoint is {mine[:12]}...); {hint}")
    elif cache.vae_config and hasattr(vae, "config") and cache.vae_config != json.loads(
            strict_json.dumps(vae.config.to_dict())):
        raise ValueError(f"latent cache {cache.path} was made by a VAE of another config ({cache.vae_config}); {hint}")
    if cache.moments.shape[2] != 2 * vae.config.embed_dim:
        raise ValueError(f"latent cache {cache.path} has {cache.moments.shape[2] // 2} latent channels, the VAE "
                         f"{vae.config.embed_dim}: the cache was made with another VAE; {hint}")
    if image_size is not None and cache.image_size is not None and cache.image_size != image_size:
        raise ValueError(f"latent cache {cache.path} holds {cache.image_size}px images, the recipe's "
                         f"data.image_size is {image_size}; {hint}")


# ---- the command ------------------------------------------------------------------------------------------------
def image_folder(root: str, image_size: int) -> ImageFolderSource:
    """The class folders under ``root/train`` when it exists (an ImageNet root), else under ``root``."""
    base = Path(root)
    return ImageFolderSource(base / "train" if (base / "train").is_dir() else base, image_size, flip=False)


def _prepare(job: CacheJob, vae_sha256: str, overwrite: bool) -> list[int] | None:
    """Rank 0: the chunks still to encode (None: the cache file is already this one), after checking that an
    existing parts folder was made with these settings."""
    from marval_rl.config import RecipeError

    settings = job_settings(job, vae_sha256)
    if overwrite and job.parts_dir.exists():
        shutil.rmtree(job.parts_dir)
    if job.out.is_file() and not overwrite:
        try:
            have = CachedLatentSource(job.out).metadata
        except ValueError:
            have = {}
        if (have.get("vae_sha256") == vae_sha256 and have.get("image_size") == str(job.image_size)
                and have.get("files_sha256") == files_digest(job.samples, job.root)):
            return None
        raise RecipeError(f"data.cache_file={job.out} exists and holds another cache (other VAE, image size or "
                          f"files); use another data.cache_file, or --overwrite to replace it")
    job.parts_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(job.parts_dir)
    manifest = job.parts_dir / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        diff = [f"{k} {str(old.get(k))[:12]} -> {str(v)[:12]}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise RecipeError(f"{job.parts_dir} holds chunks made with other settings ({'; '.join(diff)}): rerun "
                              f"with the earlier ones to continue, or add --overwrite to start afresh")
    else:
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(strict_json.dumps(settings, indent=1)))
    return [k for k in range(job.num_chunks) if not job.part_done(k)]


def run_cache(recipe, vae, *, overwrite: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
              batch_size: int = DEFAULT_BATCH_SIZE, stop_after_chunks: int | None = None,
              progress: bool = True) -> dict:
    """``marval-rl cache``: encode the recipe's image folder with ``vae`` (the recipe's ``vae.checkpoint``,
    loaded by the caller) into ``data.cache_file``, this rank's
    share of the chunks; rank 0 assembles the file. ``stop_after_chunks`` (tests) stops each rank after that
    many chunks, as a kill would, leaving the parts for a rerun. Returns a summary (rank 0's is complete)."""
    from marval_rl.config import RecipeError

    d, t0 = recipe.data, time.perf_counter()
    out = Path(d.cache_file)
    tree = image_folder(d.root, d.image_size)
    if vae is None:
        raise RecipeError("cache needs vae.checkpoint (the VAE whose latents training will read)")
    if d.image_size % vae.config.stride:
        raise RecipeError(f"data.image_size {d.image_size} is not divisible by the VAE's stride {vae.config.stride}")
    vae_sha256 = vae_fingerprint(vae)
    job = CacheJob(out, tree.folder.root, [(p, int(y)) for p, y in tree.folder.samples], list(tree.class_names),
                   d.image_size, chunk_size, batch_size)
    pending = distributed.broadcast_object(
        distributed.on_main(lambda: _prepare(job, vae_sha256, overwrite), "checking the cache's parts folder"))
    summary = {"cache_file": str(out), "images": len(job.samples), "classes": len(job.classes),
               "image_size": job.image_size, "world_size": distributed.world_size()}
    if pending is None:
        return {**summary, "up_to_date": True}
    mine = pending[distributed.rank()::distributed.world_size()]
    if stop_after_chunks is not None:
        mine = mine[:stop_after_chunks]
    bad = encode_chunks(vae, job, mine, recipe.device, num_workers=d.num_workers, progress=progress)
    bad = [e for errors in distributed.all_gather_object(bad) for e in errors]
    main_rank = distributed.is_main()   # (asked before finish(): after it every process reads as rank 0)
    distributed.finish()   # the ranks are done; rank 0's long write below needs no peer waiting on it
    summary.update(chunks=job.num_chunks, chunks_encoded=len(pending),
                   minutes=round((time.perf_counter() - t0) / 60, 2))
    if bad and main_rank:    # (rank 0 says it for all: one line, not one per rank)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"cannot decode image {bad[0]}{more}; replace or remove it and rerun: the chunks "
                         f"already written to {job.parts_dir} are kept")
    if bad or stop_after_chunks is not None or not main_rank:
        return {**summary, "stopped": stop_after_chunks is not None}
    missing = [k for k in range(job.num_chunks) if not job.part_path(k).is_file()]
    if missing:   # every pending chunk was some rank's: a bug, not a user's mistake
        raise RuntimeError(f"{len(missing)} chunk(s) of {job.num_chunks} have no part after every rank finished "
                           f"(first: {job.part_path(missing[0])})")
    meta = cache_metadata(vae, job.image_size, job.classes, files_sha256=files_digest(job.samples, job.root),
                          num_images=str(len(job.samples)))
    summary["bytes"] = write_cache_file(out, [job.part_path(k) for k in range(job.num_chunks)], meta)
    shutil.rmtree(job.parts_dir)
    summary["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    return summary
