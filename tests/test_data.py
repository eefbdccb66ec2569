"""marval_rl.data: emoji-56 assets and renderer, ImageFolder / cached-latent sources, prompts. Offline, fast."""
import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marval_rl.config import DataSection
from marval_rl.data import (NUM_CLASSES, Augment, CachedLatentSource, EmojiDataset, ImageFolderSource,
                            build_source, cache_latents, center_crop_arr, class_names, class_prompts,
                            emoji_classes, imagenet_class_names, load_sprites, prompt, render, TEMPLATES,
                            TRAIN_TEMPLATES)
from marval_rl.data import emoji as emoji_mod
from marval_rl.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

ASSETS = Path(emoji_mod.__file__).parent / "assets"


# ---- assets ---------------------------------------------------------------------------------------------------
def test_sprite_sheet_has_56_nonempty_sprites():
    sprites = load_sprites()
    assert sprites.shape == (56, 4, 64, 64) and sprites.dtype == torch.uint8
    alpha = sprites[:, 3].float() / 255
    coverage = alpha.mean(dim=(1, 2))
    assert (coverage > 0.15).all(), coverage.min()            # every glyph is really there
    # Tight crop, padded to a square: each sprite touches at least two opposite edges.
    touches = ((alpha[:, 0].amax(1) > 0) & (alpha[:, -1].amax(1) > 0)) | \
              ((alpha[:, :, 0].amax(1) > 0) & (alpha[:, :, -1].amax(1) > 0))
    assert touches.all()
    assert len({s[:3].numpy().tobytes() for s in sprites}) == 56  # all different
    assert (ASSETS / "emoji56.png").stat().st_size < 1_000_000


def test_class_table_matches_csv_and_imagenet():
    with open(ASSETS / "emoji56.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = emoji_classes()
    assert len(rows) == len(classes) == NUM_CLASSES == 56
    for row, c in zip(rows, classes):
        assert (row["name"], row["codepoint"], int(row["imagenet_index"])) == (c.name, c.codepoint, c.imagenet_index)
    assert class_names()[:2] == ["lion", "tiger"] and class_names()[-1] == "shopping cart"
    by_name = {c.name: c for c in classes}
    assert by_name["panda"].imagenet_index == 388 and by_name["banana"].char == "\U0001F34C"
    lemmas = imagenet_class_names(all_synonyms=True)
    for c in classes:  # the name (or a word of it, e.g. "racing car" / "race car") is in the ImageNet lemma
        assert c.name.split()[-1] in lemmas[c.imagenet_index], (c, lemmas[c.imagenet_index])
    assert len({c.imagenet_index for c in classes}) == 56


# ---- render ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 32, 64])
def test_render_shapes(size):
    x = render([0, 5, 55], size, seed=0, augment="light")
    assert x.shape == (3, 3, size, size) and x.dtype == torch.uint8


def test_render_deterministic_and_batch_independent():
    ids = [3, 17, 17, 40, 55, 0, 9, 22]
    for preset in ("full", "light"):
        a = render(ids, 32, seed=7, augment=preset)
        assert torch.equal(a, render(ids, 32, seed=7, augment=preset))
        for i in (0, 2, 5, 7):  # image i alone (with its stream index) == image i inside the batch
            assert torch.equal(render([ids[i]], 32, seed=7, augment=preset, start_index=i)[0], a[i])
        assert torch.equal(render(ids[4:], 32, seed=7, augment=preset, start_index=4), a[4:])
        b = render(ids, 32, seed=8, augment=preset)
        assert all(not torch.equal(a[i], b[i]) for i in range(len(ids)))
    # Same class, different stream index -> a different augmentation.
    c = render([17, 17], 32, seed=7, augment="full")
    assert not torch.equal(c[0], c[1])


def test_augment_presets():
    ids = list(range(0, 56, 4))
    none, light, full = (render(ids, 32, seed=1, augment=p) for p in ("none", "light", "full"))
    # none: centred at scale 0.8 on white -> white corners; identical for every stream index and seed.
    corners = none[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).all()
    assert torch.equal(none, render(ids, 32, seed=99, augment="none", start_index=5))
    # light keeps a white background; full uses coloured backgrounds for about half of the images.
    assert (light[:, :, 0, 0] == 255).all()
    assert not torch.equal(light, none) and not torch.equal(full, light)
    full_many = render([0] * 64, 32, seed=1, augment="full")
    coloured = (full_many[:, :, 0, 0].int() - 255).abs().sum(1) > 60
    assert 10 < int(coloured.sum()) < 54
    assert Augment.preset("light").rotation == 8.0 and Augment.preset("full").background == "mixed"
    custom = Augment(background="random", scale=(0.5, 0.6))
    assert render([1], 16, augment=custom).shape == (1, 3, 16, 16)


def test_render_keeps_sprite_inside_canvas():
    # Strongest geometry the presets allow: the sprite's alpha coverage must survive (no clipping).
    aug = dataclasses.replace(Augment.preset("full"), background="white", brightness=0, contrast=0, saturation=0)
    x = render([40] * 32, 32, seed=3, augment=aug).float()   # soccer ball: round, fills its box
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    assert (border > 200).float().mean() > 0.9                # border is (almost) all background


# ---- EmojiDataset ---------------------------------------------------------------------------------------------
def test_emoji_dataset_values_and_order():
    ds = EmojiDataset("train", image_size=16, per_class=3, seed=0, augment="full")
    assert len(ds) == 3 * 56 and ds.num_classes == 56 and ds.class_names == class_names()
    assert ds.images.shape == (168, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.labels[:57].tolist() == list(range(56)) + [0]  # interleaved
    x, y = ds[57]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.min() < -0.5 and x.max() > 0.5
    # A smaller per_class is a prefix of a larger one.
    small = EmojiDataset("train", image_size=16, per_class=1, seed=0, augment="full")
    assert torch.equal(small.images, ds.images[:56])


def test_emoji_train_test_disjoint():
    train = EmojiDataset("train", image_size=16, per_class=4, seed=0, augment="light")
    test = EmojiDataset("test", image_size=16, per_class=4, seed=0, augment="light")
    assert torch.equal(train.labels, test.labels)
    train_bytes = {im.numpy().tobytes() for im in train.images}
    assert not any(im.numpy().tobytes() in train_bytes for im in test.images)
    other_seed = EmojiDataset("train", image_size=16, per_class=4, seed=1, augment="light")
    assert not torch.equal(other_seed.images, train.images)


def test_emoji_dataset_class_subset_and_cache_copy():
    ds = EmojiDataset("test", image_size=16, per_class=2, augment="none", classes=["banana", 0])
    assert ds.class_names == ["banana", "lion"] and ds.class_ids == [16, 0] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 1, 0, 1]
    ds.images.zero_()  # a user's in-place edit must not leak into the in-memory render cache
    again = EmojiDataset("test", image_size=16, per_class=2, augment="none", classes=["banana", 0])
    assert again.images.float().mean() > 100


# ---- ImageFolder ----------------------------------------------------------------------------------------------
def _write_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, sizes in {"cat": [(50, 30), (24, 40)], "dog": [(100, 64)]}.items():
        (root / cls).mkdir(parents=True)
        for j, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{j}.png")


def test_center_crop_arr():
    im = Image.new("RGB", (100, 64), (10, 200, 30))
    out = center_crop_arr(im, 16)
    assert out.size == (16, 16) and out.getpixel((8, 8)) == (10, 200, 30)
    assert center_crop_arr(Image.new("RGB", (9, 20)), 16).size == (16, 16)  # upscales small images too


def test_image_folder_source(tmp_path):
    _write_tree(tmp_path / "tree")
    ds = ImageFolderSource(tmp_path / "tree", image_size=16)
    assert len(ds) == 3 and ds.num_classes == 2 and ds.class_names == ["cat", "dog"]
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
    assert [ds[i][1] for i in range(3)] == [0, 0, 1]
    plain = ImageFolderSource(tmp_path / "tree", image_size=16, flip=False)
    a = plain[2][0]
    flips = {torch.equal(ds[2][0], a.flip(-1)) for _ in range(30)}
    assert flips == {True, False}  # random flip happens, sometimes
    # build_source finds root/<split> when it exists.
    (tmp_path / "imnet").mkdir()
    _write_tree(tmp_path / "imnet" / "train")
    src = build_source(DataSection(source="imagefolder", root=str(tmp_path / "imnet"), image_size=16))
    assert isinstance(src, ImageFolderSource) and src.flip and len(src) == 3


# ---- cached latents -------------------------------------------------------------------------------------------
def test_cache_latents_roundtrip(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_groups=8, attn_resolutions=()))
    ds = EmojiDataset("train", image_size=16, per_class=1, augment="light", classes=[0, 1, 2, 3, 4])
    path = cache_latents(vae, ds, tmp_path / "lat.safetensors", batch_size=2)
    src = CachedLatentSource(path, generator=torch.Generator().manual_seed(0))
    assert len(src) == 5 and src.num_classes == 5 and src.image_size == 16
    assert src.vae_config["ch"] == 32 and src.moments.shape == (5, 2, 32, 8, 8)
    assert torch.equal(src.labels, ds.labels)
    x = torch.stack([ds[i][0] for i in range(5)])
    with torch.no_grad():
        ref = vae.encode(x).moments
        ref_flip = vae.encode(x.flip(-1)).moments
    torch.testing.assert_close(src.moments[:, 0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(src.moments[:, 1], ref_flip, atol=1e-5, rtol=1e-5)
    seen = set()
    for _ in range(20):
        m, y = src[3]
        assert y == 3 and m.shape == (32, 8, 8)
        seen.add(0 if torch.equal(m, src.moments[3, 0]) else 1)
        assert torch.equal(m, src.moments[3, 0]) or torch.equal(m, src.moments[3, 1])
    assert seen == {0, 1}
    assert DiagonalGaussian(m[None]).mean.shape == (1, 16, 8, 8)
    via_recipe = build_source(DataSection(source="latents", root=str(path)))
    assert isinstance(via_recipe, CachedLatentSource) and len(via_recipe) == 5


def test_cache_latents_rejects_random_flip(tmp_path):
    _write_tree(tmp_path / "tree")
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_groups=8, attn_resolutions=()))
    with pytest.raises(ValueError, match="flip"):
        cache_latents(vae, ImageFolderSource(tmp_path / "tree", 16, flip=True), tmp_path / "x.safetensors")


def test_cached_latent_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CachedLatentSource(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="moments"):
        CachedLatentSource(tmp_path / "wrong.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="latent cache"):
        CachedLatentSource(tmp_path / "junk.safetensors")


# ---- prompts --------------------------------------------------------------------------------------------------
def test_prompts():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[291] == "lion" and names[954] == "banana"
    assert imagenet_class_names(all_synonyms=True)[0] == "tench, Tinca tinca"
    assert prompt("ambulance") == "a photo of an ambulance"
    assert prompt("lion") == "a photo of a lion"
    assert prompt("umbrella", "emoji") == "an emoji of an umbrella"
    assert prompt("ice cream", "paper") == "A harmonious and high quality image of ice cream"
    assert prompt("otter", "cartoon") == "a cartoon otter"
    assert prompt("otter", "my {} pic") == "my otter pic"
    assert {"photo", "paper", "emoji"} <= set(TEMPLATES) and len(TEMPLATES) >= 8
    assert len(TRAIN_TEMPLATES) >= 8 and all("{}" in t for t in TRAIN_TEMPLATES)
    assert class_prompts(torch.tensor([0, 28]), class_names()) == ["a photo of a lion", "a photo of an ambulance"]
    with pytest.raises(ValueError, match="template"):
        prompt("lion", "no-such-template")


# ---- errors ---------------------------------------------------------------------------------------------------
def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="emoji, imagefolder, latents"):
        build_source(DataSection(source="cifar"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_source(DataSection(source="imagefolder", root=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="root"):
        build_source(DataSection(source="imagefolder", root=""))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        build_source(DataSection(source="imagefolder", root=str(tmp_path / "empty")))
    (tmp_path / "empty2" / "cls").mkdir(parents=True)  # a class folder without images
    with pytest.raises(ValueError, match="is empty"):
        ImageFolderSource(tmp_path / "empty2", 16)
    with pytest.raises(ValueError, match="is empty"):
        build_source(DataSection(source="emoji", per_class=0))
    with pytest.raises(ValueError, match="none, light, full"):
        build_source(DataSection(source="emoji", augment="heavy"))
    with pytest.raises(ValueError, match="preset"):
        render([0], 16, augment="heavy")
    with pytest.raises(ValueError, match="class ids"):
        render([56], 16)
    with pytest.raises(ValueError, match="size"):
        render([0], 4)
    with pytest.raises(ValueError, match="split"):
        EmojiDataset("val")
    with pytest.raises(ValueError, match="unknown emoji class"):
        EmojiDataset(classes=["unicorn"])
    with pytest.raises(ValueError, match="background"):
        Augment(background="checker")


def test_build_source_emoji():
    ds = build_source(DataSection(source="emoji", image_size=16, per_class=2, augment="light", seed=3))
    assert isinstance(ds, EmojiDataset) and len(ds) == 112 and ds.augment == Augment.preset("light")
    test = build_source(DataSection(source="emoji", image_size=16, per_class=2, seed=3), split="test", per_class=1)
    assert len(test) == 56 and test.split == "test"
