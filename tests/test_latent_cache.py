"""`marval-rl cache`: an image folder -> a latent cache file -> `distill` / `pretrain` with data.source=latents.

The shipped embedded VAE (stride 4) at image_size 32, on a tree of 3 classes x 3 PNGs of different sizes and
modes that the module fixture writes. Each test names the bug it catches; every one of those bugs was applied
by hand and made its test fail.
"""
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from marval_rl.cli import main
from marval_rl.config import load_recipe
from marval_rl.data.latent_cache import run_cache
from marval_rl.data.sources import CachedLatentSource, vae_fingerprint
from marval_rl.loading import load_vae
from marval_rl.models.checkpoints import save_pretrained

RECIPE = "distill_embedded"            # the shipped teacher + VAE (32 px, 56 classes)
# (width, height, mode): wide, tall, >= 2x the size (the BOX-halving branch), a square, grey and palette images
SIZES = [(50, 30, "RGB"), (24, 40, "RGB"), (100, 64, "RGB"), (33, 33, "L"), (64, 80, "P")]


def _write_tree(root: Path, classes=("ant", "bee", "cat"), per_class=3) -> None:
    rng = np.random.default_rng(0)
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            w, h, mode = SIZES[(c + j) % len(SIZES)]
            # smooth images (the VAE was trained on renders, not noise), plus a little noise for variety
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200 + rng.integers(0, 50, (h, w, 3))
            Image.fromarray(base.astype(np.uint8)).convert(mode).save(root / cls / f"{j}.png")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _write_tree(root / "tree")
    return root / "tree"


def cache_args(tree, out, *extra):
    return ["cache", RECIPE, "data.source=imagefolder", f"data.root={tree}", f"data.cache_file={out}", *extra]


@contextmanager
def one_thread():
    """torchrun gives each rank OMP_NUM_THREADS=1; a CPU's float sums change order with the thread count, so the
    one-process reference runs at one thread too (the bitwise claim is per thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's / MAR's crop, restated from its definition (guided-diffusion image_datasets.center_crop_arr): halve
    with BOX while the short side is >= 2 size, BICUBIC so the short side is size, then the centre square."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def test_cache_is_the_direct_encoding_of_each_image_and_its_flip(tree, tmp_path, capsys):
    """Catches: flipping the height (or not flipping), another crop or scaling (a plain square resize), labels
    or files out of sorted order, a chunk boundary dropping or repeating an image, parts assembled out of chunk
    order, the memory map reading from the wrong offset."""
    out = tmp_path / "c.safetensors"
    assert main(cache_args(tree, out, "--chunk-size", "4", "--batch-size", "3")) == 0   # 3 chunks, ragged batches
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 9 and summary["chunks"] == 3 and summary["bytes"] == out.stat().st_size
    assert not out.with_name(out.name + ".parts").exists()        # the parts are gone once the file is whole

    cache = CachedLatentSource(out)
    vae = load_vae(load_recipe(RECIPE).vae).eval()
    files = sorted(tree.glob("*/*.png"))                          # class folders, then files, in sorted order
    classes = sorted(p.name for p in tree.iterdir())
    assert cache.class_names == classes and cache.num_classes == 3 and cache.image_size == 32
    assert cache.labels.tolist() == [classes.index(p.parent.name) for p in files]
    assert cache.vae_sha256 == vae_fingerprint(vae)
    x = torch.stack([torch.from_numpy(adm_center_crop(Image.open(p).convert("RGB"), 32)).permute(2, 0, 1)
                     for p in files]).double() / 127.5 - 1
    with torch.no_grad():   # one image at a time: no batch in common with the cache's batches of 3
        ref = torch.stack([torch.cat([vae.encode(x[i:i + 1].float()).moments,
                                      vae.encode(x[i:i + 1].float().flip(-1)).moments]) for i in range(len(files))])
    # Bound: the cache and the reference differ only in the order of float32 sums (other batch shapes): per
    # output |err| <~ n eps |terms| with n <= 3*3*64 terms per conv and eps = 6e-8, about 3e-5 relative per
    # layer; ten layers give < 1e-4 of the moments' scale. A wrong crop or flip moves them by O(0.1).
    scale = ref.abs().max().item()
    assert cache.moments.shape == (9, 2, 32, 8, 8)
    torch.testing.assert_close(cache.moments, ref, rtol=0, atol=1e-4 * scale)
    assert (cache.moments[:, 0] - cache.moments[:, 1]).abs().max() > 100 * 1e-4 * scale   # the flip is a real one
    # the streamed file is a safetensors file: the library reads what the memory map reads
    lib = load_file(str(out))
    assert torch.equal(lib["moments"], cache.moments) and torch.equal(lib["labels"], cache.labels)


def test_distill_and_pretrain_run_on_the_cache(tree, tmp_path, capsys):
    """Catches: the cache's moments reaching distill / MAR pretraining in another layout (e.g. without the flip
    axis), a memory-mapped cache that torch cannot index or sample from."""
    out = tmp_path / "c.safetensors"
    assert main(cache_args(tree, out)) == 0
    common = ["data.source=latents", f"data.root={out}", "distill.generator_optim.steps=2",
              "distill.fake_optim.steps=2",
              "distill.generator_optim.batch_size=4", "distill.fake_optim.batch_size=4", "distill.sample_every=0"]
    assert main(["distill", RECIPE, *common, f"output_dir={tmp_path / 'd'}"]) == 0
    assert (tmp_path / "d" / "student" / "model.safetensors").is_file()
    assert main(["pretrain", "pretrain_embedded", "pretrain.stages=[mar]", "vae.checkpoint=${asset:embedded/vae}",
                 "data.source=latents", f"data.root={out}", "pretrain.mar.optim.steps=2",
                 "pretrain.mar.optim.batch_size=4",
                 "pretrain.sample_every=0", f"output_dir={tmp_path / 'p'}"]) == 0
    assert (tmp_path / "p" / "teacher" / "model.safetensors").is_file()


def test_interrupted_and_two_rank_caches_equal_one_process(tree, tmp_path):
    """Catches: a rank skipping its share of the chunks (the file is never written), a rerun that encodes
    finished chunks again, a part of another file list taken as finished (its bytes end up in the file).
    (Batch boundaries that moved with the rank would change bits on some CPUs; on this one the embedded VAE
    gives the same bits for any batch split, so this test cannot see that bug.)"""
    recipe = load_recipe(RECIPE, ["data.source=imagefolder", f"data.root={tree}",
                                  f"data.cache_file={tmp_path / 'one.safetensors'}"])
    with one_thread():
        one = run_cache(recipe, load_vae(recipe.vae), chunk_size=2, batch_size=2, progress=False)           # 5 chunks: 2,2,2,2,1
        recipe.data.cache_file = str(tmp_path / "resumed.safetensors")
        first = run_cache(recipe, load_vae(recipe.vae), chunk_size=2, batch_size=2, stop_after_chunks=2, progress=False)
        parts = tmp_path / "resumed.safetensors.parts"
        assert first["stopped"] and not (tmp_path / "resumed.safetensors").exists()
        assert sorted(p.name for p in parts.glob("part-*")) == ["part-000000.safetensors", "part-000001.safetensors"]
        (parts / "part-000001.safetensors").unlink()
        (parts / "part-000002.safetensors").write_bytes((parts / "part-000000.safetensors").read_bytes())  # chunk 0's
        rest = run_cache(recipe, load_vae(recipe.vae), chunk_size=2, batch_size=2, progress=False)
    assert one["chunks"] == 5 and rest["chunks_encoded"] == 4      # chunk 0 reused; 1..4 encoded (2 was stale)
    ref = (tmp_path / "one.safetensors").read_bytes()
    assert (tmp_path / "resumed.safetensors").read_bytes() == ref

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MARVAL_DIST_BACKEND": "gloo"}
    two = tmp_path / "two.safetensors"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "marval_rl.cli", *cache_args(tree, two, "--chunk-size", "2", "--batch-size", "2")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["world_size"] == 2
    assert two.read_bytes() == ref


def test_resume_refuses_other_settings_and_an_up_to_date_cache_is_kept(tree, tmp_path, capsys):
    """Catches: parts of another batch size (or VAE) mixed into one file, a finished cache encoded again or
    silently replaced by one of another image size."""
    out = tmp_path / "c.safetensors"
    recipe = load_recipe(RECIPE, ["data.source=imagefolder", f"data.root={tree}", f"data.cache_file={out}"])
    run_cache(recipe, load_vae(recipe.vae), chunk_size=2, batch_size=2, stop_after_chunks=1, progress=False)
    assert main(cache_args(tree, out, "--chunk-size", "2", "--batch-size", "3")) == 2
    _one_line_error(capsys, "batch_size 2 -> 3", "--overwrite")
    assert main(cache_args(tree, out, "--chunk-size", "2", "--batch-size", "2")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["chunks_encoded"] == 4
    assert main(cache_args(tree, out, "--chunk-size", "2", "--batch-size", "2")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["up_to_date"] is True
    assert main(cache_args(tree, out, "data.image_size=16")) == 2
    assert "exists and holds another cache" in capsys.readouterr().err
    assert main(cache_args(tree, out, "data.image_size=16", "--overwrite")) == 0
    assert CachedLatentSource(out).image_size == 16


def test_format_1_cache_still_reads(tmp_path):
    """Catches: the reader dropping files written before the VAE fingerprint (format 1: config only)."""
    vae = load_vae(load_recipe(RECIPE).vae)
    meta = {"format": "marval-rl-latents/1", "vae_config": json.dumps(vae.config.to_dict()), "image_size": "32",
            "num_classes": "2"}
    save_file({"moments": torch.randn(3, 2, 32, 8, 8), "labels": torch.tensor([0, 1, 1])},
              str(tmp_path / "old.safetensors"), metadata=meta)
    old = CachedLatentSource(tmp_path / "old.safetensors")
    assert old.vae_sha256 == "" and old.num_classes == 2 and len(old) == 3
    from marval_rl.data.latent_cache import check_cache_fits

    check_cache_fits(old, vae, 32)                                 # same config: accepted
    meta["vae_config"] = json.dumps({**vae.config.to_dict(), "ch": 64})
    save_file({"moments": torch.randn(3, 2, 32, 8, 8), "labels": torch.tensor([0, 1, 1])},
              str(tmp_path / "other.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="VAE of another config"):
        check_cache_fits(CachedLatentSource(tmp_path / "other.safetensors"), vae, 32)


# ---- bad input: one line, exit 2 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """The embedded VAE's config with slightly different weights (so the teacher still pairs with it)."""
    vae = load_vae(load_recipe(RECIPE).vae)
    with torch.no_grad():
        vae.quant_conv.bias.add_(1e-3)
    path = tmp_path_factory.mktemp("vae") / "other_vae"
    save_pretrained(vae, path)
    return path


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "caching latents" not in x]  # (tqdm)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_input(tree, tmp_path, capsys, other_vae):
    """Catches: a traceback (or a silent run on wrong data) for each ordinary mistake below."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "noimages" / "cls").mkdir(parents=True)
    for root, needle in ((tmp_path / "afile", "no such folder"), (tmp_path / "missing", "no such folder"),
                         (tmp_path / "empty", "is empty"), (tmp_path / "noimages", "is empty")):
        assert main(cache_args(root, tmp_path / "x.safetensors")) == 2
        _one_line_error(capsys, needle)
    assert main(["cache", RECIPE, f"data.cache_file={tmp_path / 'x.safetensors'}"]) == 2
    _one_line_error(capsys, "data.source=imagefolder")
    assert main(["cache", RECIPE, "data.source=imagefolder", f"data.root={tree}"]) == 2
    _one_line_error(capsys, "data.cache_file")

    # an image that cannot be decoded is named; the chunks without one are kept for the rerun
    broken = tmp_path / "broken"
    _write_tree(broken)
    (broken / "bee" / "1.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "b.safetensors"
    assert main(cache_args(broken, out, "--chunk-size", "3")) == 2
    _one_line_error(capsys, "cannot decode image", str(broken / "bee" / "1.png"))
    assert not out.exists() and len(list((tmp_path / "b.safetensors.parts").glob("part-*"))) == 2

    # a cache made by another VAE, or at another image size, used by distill
    cache16, cache32 = tmp_path / "c16.safetensors", tmp_path / "c32.safetensors"
    assert main(cache_args(tree, cache16, "data.image_size=16")) == 0
    assert main(cache_args(tree, cache32, f"vae.checkpoint={other_vae}")) == 0
    capsys.readouterr()
    distill = ["distill", RECIPE, "data.source=latents", "distill.generator_optim.steps=1",
               "distill.fake_optim.steps=1",
               f"output_dir={tmp_path / 'd'}"]
    assert main([*distill, f"data.root={cache32}"]) == 2
    _one_line_error(capsys, "made by another VAE", str(cache32))
    assert main([*distill, f"data.root={cache16}"]) == 2
    _one_line_error(capsys, "holds 16px images", "data.image_size is 32")
