"""Weights by name (marval_rl/hub.py), offline: a real Hugging Face cache layout built in tmp_path
(``models--org--repo/{blobs,snapshots/<commit>,refs/main}``, files as symlinks to their blobs), found
through ``HF_HOME`` with ``HF_HUB_OFFLINE=1``, and loaded by the real loaders (load_official_mar /
load_official_vae, open_clip, transformers CLIPModel / PickScore, ImageReward on BLIP). No loader is mocked;
``download`` is exercised only where it needs no network (unknown names, offline).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_MAR, tiny_constructor
from marval_rl import hub
from marval_rl.hub import HubError, download, resolve
from marval_rl.models.checkpoints import load_official_mar, load_official_vae
from marval_rl.rewards import RewardError, build_reward

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_IR = ROOT / "tests" / "fixtures" / "image_reward_golden"
PROMPTS = ["a photo of a lion", "an emoji of a banana"]
MAR_REV = hub.WEIGHTS["mar_base"].revision

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the cache, as huggingface_hub lays it out
def put_in_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str | None = None,
                 ref: str | None = "main", not_fetched: tuple[str, ...] = ()) -> Path:
    """Write ``files`` (path in repo -> source file or bytes) into ``cache`` the way ``hf_hub_download`` does:
    content in ``blobs/<sha256>``, ``snapshots/<commit>/<path>`` a relative symlink to it, ``refs/<ref>``
    holding the commit (a download by commit hash writes no ref: ``ref=None``). ``not_fetched``: files of the
    repo left out by allow-patterns, listed in ``trees/<commit>.json`` as huggingface_hub 2.x's
    ``snapshot_download`` records them. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    for rel, src in files.items():
        data = src.read_bytes() if isinstance(src, Path) else src
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    if not_fetched:
        listing = {rel: {"size": 1, "blob_id": hashlib.sha1(rel.encode()).hexdigest()}
                   for rel in list(files) + list(not_fetched)}
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return repo / "snapshots" / commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty HF cache under HF_HOME=tmp_path/hf, offline; the environment as a user would set it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = tmp_path / "hf" / "hub"
    c.mkdir(parents=True)
    assert hub.cache_dir() == c
    return c


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- resolve
def test_local_paths_are_returned_as_given(cache, tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert resolve(str(f)) == str(f)
    assert resolve(f) == str(f)
    assert resolve(str(tmp_path / "missing.pth")) == str(tmp_path / "missing.pth")  # the loader reports it
    assert resolve("ViT-B-32") == "ViT-B-32"                                          # a config name, not a path


def test_cache_location_follows_the_environment_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.is_offline()


def test_official_mar_checkpoint_by_hub_id(cache, tiny_mar):
    snap = put_in_cache(cache, "someone/tiny-mar", {"checkpoint-last.pth": TINY_MAR / "checkpoint.pth",
                                                    "config.json": TINY_MAR / "config.json"})
    commit = snap.name
    by_file = resolve("someone/tiny-mar/checkpoint-last.pth")
    assert Path(by_file) == snap / "checkpoint-last.pth" and Path(by_file).is_symlink()
    assert resolve("someone/tiny-mar", "checkpoint-last.pth") == by_file
    assert resolve(f"someone/tiny-mar@{commit}/checkpoint-last.pth") == by_file
    assert Path(resolve("someone/tiny-mar")) == snap                     # no file asked: the snapshot folder
    model = load_official_mar(resolve("someone/tiny-mar/checkpoint-last.pth"), tiny_constructor())
    ref = tiny_mar.state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_table_names_at_their_pinned_revision(cache, tmp_path):
    """mar_base / kl16 are pinned to a commit of jadechoghari/mar: found there (no refs/main), and
    loaded by the official loaders."""
    from marval_rl.models.vae import AutoencoderKL, VAEConfig

    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, attn_resolutions=(), num_groups=8)
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg)
    torch.save({"model": vae.state_dict()}, tmp_path / "kl16.ckpt")
    put_in_cache(cache, "jadechoghari/mar", {"checkpoint-last.pth": TINY_MAR / "checkpoint.pth",
                                            "kl16.ckpt": tmp_path / "kl16.ckpt"}, commit=MAR_REV, ref=None)
    path = resolve("mar_base")
    assert MAR_REV in path and path.endswith("checkpoint-last.pth")
    load_official_mar(path, tiny_constructor())
    loaded = load_official_vae(resolve("kl16"), cfg)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())
    # the same repo at main (another commit) is not what the table pins
    put_in_cache(cache, "jadechoghari/mar", {"mar-large.safetensors": b"not this one"}, commit="b" * 40)
    assert resolve("mar_large").endswith("mar-large.safetensors")
    assert MAR_REV in resolve("mar_base")


# ----------------------------------------------------------------------------- missing weights: one line, the command
def test_missing_weights_name_the_download_command(cache, tmp_path, monkeypatch):
    with pytest.raises(HubError) as e:
        resolve("someone/absent/checkpoint-last.pth")
    assert "`marval-rl download someone/absent/checkpoint-last.pth`" in one_line(e.value)
    with pytest.raises(HubError) as e:
        resolve("someone/absent", "ImageReward.pt")
    assert "`marval-rl download someone/absent/ImageReward.pt`" in one_line(e.value)
    for name in hub.WEIGHTS:
        with pytest.raises(HubError) as e:
            resolve(name)
        msg = one_line(e.value)
        assert f"`marval-rl download {name}`" in msg and hub.WEIGHTS[name].repo_id in msg and str(cache) in msg
    # a relative path in the recipes' layout that is not there: the --dir command that puts it there
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError) as e:
        resolve("pretrained_models/vae/kl16.ckpt")
    assert "`marval-rl download kl16 --dir pretrained_models`" in one_line(e.value)
    assert hub.fetch_command(str(tmp_path / "w" / "open_clip" / "ViT-B-32.safetensors")) == \
        f"marval-rl download clip_vit_b32 --dir {tmp_path / 'w'}"


def test_reward_loaders_missing_hub_ids_are_one_line(cache, tmp_path, monkeypatch):
    with pytest.raises(RewardError) as e:
        build_reward("pickscore", path="pickscore")
    assert one_line(e.value).startswith("pickscore: ") and "`marval-rl download pickscore`" in str(e.value)
    with pytest.raises(RewardError) as e:
        build_reward("image_reward", checkpoint="THUDM/ImageReward", vocab="bert_base_uncased")
    assert "`marval-rl download THUDM/ImageReward/med_config.json`" in one_line(e.value)
    with pytest.raises(RewardError) as e:
        build_reward("clip_score", model="ViT-B-32", weights="clip_vit_b32")
    assert "`marval-rl download clip_vit_b32`" in one_line(e.value)
    # the recipes' relative paths: the command that fetches into that layout
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError) as e:
        build_reward("pickscore", path="pretrained_models/PickScore_v1")
    assert "`marval-rl download pickscore --dir pretrained_models`" in one_line(e.value)
    # an absolute path keeps the loader's own message, plus the command when the layout is the table's
    with pytest.raises(RewardError, match=r"model folder not found: .*PickScore_v1; fetch it with "
                                          r"`marval-rl download pickscore --dir "):
        build_reward("pickscore", path=str(tmp_path / "models" / "PickScore_v1"))


# ----------------------------------------------------------------------------- reward loaders through the cache
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_open_clip_score_by_hub_id(cache, tmp_path):
    import open_clip

    cfg = tmp_path / "tiny-hub-clip.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hub-clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    put_in_cache(cache, "someone/tiny-open-clip", {"open_clip_model.safetensors": tmp_path / "w.safetensors",
                                                   "tiny-hub-clip.json": cfg})
    x = torch.rand(2, 3, 64, 64)
    local = build_reward("clip_score", model=str(cfg), weights=str(tmp_path / "w.safetensors"))
    by_repo = build_reward("clip_score", model="someone/tiny-open-clip/tiny-hub-clip.json",
                           weights="someone/tiny-open-clip")               # default file: open_clip_model.safetensors
    torch.testing.assert_close(by_repo(x, PROMPTS), local(x, PROMPTS))
    by_file = build_reward("clip_score", model=str(cfg), weights="someone/tiny-open-clip/open_clip_model.safetensors")
    torch.testing.assert_close(by_file(x, PROMPTS), local(x, PROMPTS))


def write_clip_tokenizer(folder: Path) -> None:
    """CLIP BPE tokenizer files from open_clip's bundled vocabulary (as tests/test_rewards_models.py)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    enc = dict(st.encoder)
    enc["<|startoftext|>"] = enc.pop("<start_of_text>")
    enc["<|endoftext|>"] = enc.pop("<end_of_text>")
    (folder / "vocab.json").write_text(json.dumps(enc))
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(str(folder))


def test_pickscore_and_hf_clip_by_name_and_hub_id(cache, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    d = tmp_path / "PickScore_v1"
    d.mkdir()
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
                     projection_dim=16, logit_scale_init_value=2.6592)
    CLIPModel(cfg).save_pretrained(str(d))
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(str(d))
    write_clip_tokenizer(d)
    files = {p.name: p for p in d.iterdir() if p.is_file()}
    put_in_cache(cache, "yuvalkirstain/PickScore_v1", files)
    processor_only = {k: v for k, v in files.items() if k not in ("model.safetensors", "config.json")}
    put_in_cache(cache, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", processor_only,     # as a filtered download
                 not_fetched=("open_clip_model.safetensors", "model.safetensors"))

    x = torch.rand(2, 3, 100, 80)
    local = build_reward("pickscore", path=str(d))
    by_name = build_reward("pickscore", path="pickscore", processor="pickscore_processor")
    by_id = build_reward("hf_clip_score", path="yuvalkirstain/PickScore_v1", use_logit_scale=True)
    assert "models--yuvalkirstain--PickScore_v1" in by_name.path
    torch.testing.assert_close(by_name(x, PROMPTS), local(x, PROMPTS))
    torch.testing.assert_close(by_id(x, PROMPTS), local(x, PROMPTS))
    # the processor-only repo is no model folder: the loader says so
    with pytest.raises(RewardError, match=r"no weights file|has no config.json"):
        build_reward("hf_clip_score", path="pickscore_processor")


def test_image_reward_by_name_and_hub_id(cache):
    put_in_cache(cache, "THUDM/ImageReward", {"ImageReward.pt": GOLDEN_IR / "ImageReward.pt",
                                              "med_config.json": GOLDEN_IR / "med_config.json"})
    put_in_cache(cache, "google-bert/bert-base-uncased", {"vocab.txt": GOLDEN_IR / "vocab.txt"})
    local = build_reward("image_reward", checkpoint=str(GOLDEN_IR / "ImageReward.pt"),
                         med_config=str(GOLDEN_IR / "med_config.json"), vocab=str(GOLDEN_IR / "vocab.txt"),
                         vision_heads=2)
    by_name = build_reward("image_reward", checkpoint="image_reward", vocab="bert_base_uncased", vision_heads=2)
    by_id = build_reward("image_reward", checkpoint="THUDM/ImageReward/ImageReward.pt",
                         med_config="THUDM/ImageReward", vocab="google-bert/bert-base-uncased/vocab.txt",
                         vision_heads=2)
    by_file = build_reward("image_reward", checkpoint="THUDM/ImageReward/ImageReward.pt",   # med_config: same repo
                           vocab="google-bert/bert-base-uncased", vision_heads=2)
    x = torch.rand(2, 3, 40, 48)
    ref = local(x, PROMPTS)
    for reward in (by_name, by_id, by_file):
        torch.testing.assert_close(reward(x, PROMPTS), ref)


# ----------------------------------------------------------------------------- download (offline paths only)
def test_download_unknown_name_lists_the_known_ones(cache):
    with pytest.raises(HubError) as e:
        download(["mar_base", "mar_gigantic", "nope"])
    msg = one_line(e.value)
    assert "'mar_gigantic'" in msg and "'nope'" in msg
    assert all(name in msg for name in hub.WEIGHTS)
    with pytest.raises(HubError, match="known names"):
        download([])


def test_download_offline_returns_what_is_there_or_says_why_not(cache, tmp_path):
    put_in_cache(cache, "THUDM/ImageReward", {"ImageReward.pt": GOLDEN_IR / "ImageReward.pt",
                                              "med_config.json": GOLDEN_IR / "med_config.json"})
    put_in_cache(cache, "someone/tiny-mar", {"checkpoint-last.pth": TINY_MAR / "checkpoint.pth"})
    got = download(["image_reward", "someone/tiny-mar/checkpoint-last.pth"])
    assert (got[0] / "ImageReward.pt").is_file() and (got[0] / "med_config.json").is_file()
    assert got[1] == Path(resolve("someone/tiny-mar/checkpoint-last.pth"))
    with pytest.raises(HubError) as e:
        download(["pickscore"])
    assert "HF_HUB_OFFLINE" in one_line(e.value) and "pickscore" in str(e.value)
    # --dir: the recipes' layout already there
    (tmp_path / "pm" / "vae").mkdir(parents=True)
    (tmp_path / "pm" / "vae" / "kl16.ckpt").write_bytes(b"x")
    assert download(["kl16"], dir=tmp_path / "pm") == [tmp_path / "pm" / "vae" / "kl16.ckpt"]
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set and it is not in .*pm/open_clip"):
        download(["clip_vit_b32"], dir=tmp_path / "pm")


# ----------------------------------------------------------------------------- the table, the docs, the module
def test_table_is_complete_and_matches_the_docs():
    doc = (ROOT / "docs" / "weights.md").read_text()
    for w in hub.WEIGHTS.values():
        assert w.repo_id.count("/") == 1 and w.licence and w.used_by and w.what and w.local_dir
        assert f"`{w.name}`" in doc and w.repo_id in doc, w.name
        for f in w.files:
            assert f in doc, (w.name, f)
        if w.revision:
            assert len(w.revision) == 40 and w.revision in doc
    assert {"mar_base", "mar_large", "mar_huge", "kl16", "pickscore", "image_reward", "clip_vit_b32"} <= set(hub.WEIGHTS)
    text = hub.format_table()
    assert all(name in text for name in hub.WEIGHTS)
    assert "docs/weights.md" in (ROOT / "README.md").read_text()


def test_hub_module_is_low_level():
    code = ("import sys, marval_rl.hub; bad = [m for m in sys.modules if m.startswith(('marval_rl.rewards', "
            "'marval_rl.rl', 'torch', 'huggingface_hub'))]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
