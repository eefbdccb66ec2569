"""Rewards on the real architectures (open_clip CLIP, transformers CLIPModel / PickScore, ImageReward on BLIP),
at tiny random-init sizes saved to files and loaded back through the real loaders. Offline, CPU.

Preprocessing parity: the torch preprocessing inside each reward is compared with open_clip's own eval
transform and with transformers' CLIPImageProcessor on the same PIL images. ImageReward parity: golden
scores produced by the original image-reward 1.5 package (see tests/fixtures/image_reward_golden/meta.json).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from marval_rl.rewards import RewardError, build_reward

GOLDEN = Path(__file__).parent / "fixtures" / "image_reward_golden"
PROMPTS = ["a photo of a lion", "A harmonious and high quality image of fire engine", "an emoji of a banana!"]

import open_clip  # noqa: E402  (core dependencies: a missing one is an install error, not a skip)
import transformers  # noqa: E402,F401


pytestmark = pytest.mark.usefixtures("one_thread")


def pil_images() -> list[Image.Image]:
    """Downscale (320x240), upscale (60x90) and identity (224x224) cases, with texture."""
    g = np.random.default_rng(0)
    out = []
    for w, h in [(320, 240), (60, 90), (224, 224)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 11.0)], -1) * 0.35 + 0.5
        arr = np.clip(base + g.normal(0, 0.08, base.shape), 0, 1)
        out.append(Image.fromarray((arr * 255).round().astype(np.uint8)))
    return out


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float().div(255)[None]


def assert_preprocess_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Normalised-pixel agreement: PIL rounds to uint8 (one level = 1/255/std ~ 0.015 here), torch stays float."""
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()
    assert diff.mean() < 6e-3 and diff.max() < 0.03, (float(diff.mean()), float(diff.max()))


# ----------------------------------------------------------------------------- open_clip
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("open_clip")
    cfg = d / "tiny-clip-test.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-test")
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "tiny.safetensors"))
    torch.save(sd, d / "tiny.bin")
    return {"config": str(cfg), "safetensors": str(d / "tiny.safetensors"), "bin": str(d / "tiny.bin"),
            "model": model.eval(), "preprocess": preprocess, "dir": d}


def test_open_clip_score_loads_config_and_weights(open_clip_files):
    f = open_clip_files
    r = build_reward("clip_score", model=f["config"], weights=f["safetensors"])
    r_bin = build_reward("clip_score", model=f["config"], weights=f["bin"])
    ims = pil_images()
    x = to_tensor(ims[2])                                          # 224 px: preprocessing is the identity
    x = x.expand(3, -1, -1, -1).contiguous()
    with torch.no_grad():
        ref_img = f["model"].encode_image(torch.cat([f["preprocess"](ims[2])[None]] * 3), normalize=True)
        ref_txt = f["model"].encode_text(open_clip.get_tokenizer("tiny-clip-test")(PROMPTS), normalize=True)
    expected = (ref_img * ref_txt).sum(-1)
    torch.testing.assert_close(r(x, PROMPTS), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(r_bin(x, PROMPTS), r(x, PROMPTS))
    # scale / clamp conventions (CLIPScore-style reporting)
    s = build_reward("clip_score", model=f["config"], weights=f["safetensors"], scale=100, clamp_negative=True)
    torch.testing.assert_close(s(x, PROMPTS), 100 * expected.clamp(min=0), atol=2e-3, rtol=0)
    # end to end on resized inputs: same PIL image through open_clip's transform vs our torch preprocessing
    for im in ims[:2]:
        with torch.no_grad():
            e = (f["model"].encode_image(f["preprocess"](im)[None], normalize=True) * ref_txt[:1]).sum(-1)
        torch.testing.assert_close(r(to_tensor(im), PROMPTS[:1]), e, atol=5e-3, rtol=0)


def test_open_clip_preprocessing_parity(open_clip_files):
    r = build_reward("clip_score", model=open_clip_files["config"], weights=open_clip_files["safetensors"])
    for im in pil_images():
        assert_preprocess_close(r.preprocess(to_tensor(im)), open_clip_files["preprocess"](im)[None])
    # a standard config's transform too (ViT-B-32 settings, built without weights)
    tf = open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                   std=open_clip.OPENAI_DATASET_STD)
    for im in pil_images():
        assert_preprocess_close(r.preprocess(to_tensor(im)), tf(im)[None])


def test_open_clip_gradient_flows(open_clip_files):
    r = build_reward("clip_score", model=open_clip_files["config"], weights=open_clip_files["safetensors"])
    x = torch.rand(2, 3, 64, 48, requires_grad=True)
    r(x, PROMPTS[:2]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in r.parameters())


def test_open_clip_errors(open_clip_files, tmp_path):
    cfg = open_clip_files["config"]
    with pytest.raises(RewardError, match=r"weights file not found: .*missing\.safetensors"):
        build_reward("clip_score", model=cfg, weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(RewardError, match=r"model config file not found"):
        build_reward("clip_score", model=str(tmp_path / "nope.json"), weights=open_clip_files["bin"])
    with pytest.raises(RewardError, match=r"unknown open_clip model 'ViT-Q-99'"):
        build_reward("clip_score", model="ViT-Q-99", random_init=True)
    with pytest.raises(RewardError, match=r"give weights=<local file>"):
        build_reward("clip_score", model=cfg)
    # a pickle that would run code is refused (open_clip loads with weights_only=True)
    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as fh:
        pickle.dump({"x": Path("/etc/passwd")}, fh, protocol=2)
    with pytest.raises(RewardError, match=r"could not build open_clip.*(UnpicklingError|[Ww]eights only)"):
        build_reward("clip_score", model=cfg, weights=str(evil))
    # the wrong architecture for the weights: strict load fails loudly
    other = dict(TINY_OPEN_CLIP, embed_dim=16)
    (tmp_path / "tiny-other.json").write_text(json.dumps(other))
    with pytest.raises(RewardError, match=r"could not build open_clip 'tiny-other'"):
        build_reward("clip_score", model=str(tmp_path / "tiny-other.json"), weights=open_clip_files["safetensors"])


# ----------------------------------------------------------------------------- transformers CLIP / PickScore
def write_clip_tokenizer(folder: Path) -> None:
    """CLIP BPE tokenizer files built from open_clip's bundled vocabulary (the same BPE as OpenAI CLIP)."""
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


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    d = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
                     projection_dim=16, logit_scale_init_value=2.6592)
    CLIPModel(cfg).save_pretrained(str(d))
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(str(d))
    write_clip_tokenizer(d)
    return d


def _reference_hf(folder: Path, images: list[Image.Image], prompts: list[str]):
    """PickScore's reference usage: processor + model, logit_scale.exp() * text_emb @ image_emb.T."""
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    img_in = processor(images=images, return_tensors="pt")
    txt_in = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ie = model.get_image_features(**img_in)
        te = model.get_text_features(**txt_in)
        ie = ie if isinstance(ie, torch.Tensor) else ie.pooler_output   # transformers 5 returns a ModelOutput
        te = te if isinstance(te, torch.Tensor) else te.pooler_output
        ie, te = ie / ie.norm(dim=-1, keepdim=True), te / te.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * (te * ie).sum(-1), img_in["pixel_values"], (te * ie).sum(-1)


def test_hf_clip_and_pickscore_match_reference_usage(hf_clip_dir):
    ims = pil_images()
    ref_scores, ref_pixels, ref_cos = _reference_hf(hf_clip_dir, ims, PROMPTS)
    pick = build_reward("pickscore", path=str(hf_clip_dir))
    hf = build_reward("hf_clip_score", path=str(hf_clip_dir))
    assert pick.name == "pickscore" and pick.differentiable
    for i, im in enumerate(ims):
        assert_preprocess_close(pick.preprocess(to_tensor(im)), ref_pixels[i:i + 1])
        tol = 1e-5 if im.size == (224, 224) else 2e-2
        torch.testing.assert_close(pick(to_tensor(im), PROMPTS[i:i + 1]), ref_scores[i:i + 1], atol=tol * 15, rtol=0)
        torch.testing.assert_close(hf(to_tensor(im), PROMPTS[i:i + 1]), ref_cos[i:i + 1], atol=tol, rtol=0)
    x = torch.rand(2, 3, 100, 80, requires_grad=True)
    pick(x, PROMPTS[:2]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_hf_clip_errors(hf_clip_dir, tmp_path):
    with pytest.raises(RewardError, match=r"model folder not found: .*PickScore_v1"):
        build_reward("pickscore", path=str(tmp_path / "PickScore_v1"))
    with pytest.raises(RewardError, match=r"needs path="):
        build_reward("pickscore")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match=r"has no config.json"):
        build_reward("hf_clip_score", path=str(tmp_path / "empty"))
    with pytest.raises(RewardError, match=r"no preprocessor_config.json"):
        build_reward("hf_clip_score", path=str(hf_clip_dir), processor=str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- ImageReward
def golden():
    return load_file(str(GOLDEN / "golden.safetensors")), json.loads((GOLDEN / "meta.json").read_text())


@pytest.fixture(scope="module")
def image_reward():
    return build_reward("image_reward", checkpoint=str(GOLDEN / "ImageReward.pt"),
                        med_config=str(GOLDEN / "med_config.json"), vocab=str(GOLDEN / "vocab.txt"), vision_heads=2)


def test_image_reward_matches_original_package(image_reward):
    g, meta = golden()
    prompts = meta["prompts"]
    ids, mask = image_reward.tokenize(prompts)
    assert torch.equal(ids, g["input_ids"]) and torch.equal(mask, g["attention_mask"])   # tokenizer parity
    with torch.no_grad():
        cls = image_reward.net.cls_features(g["pixel_values"], g["input_ids"], g["attention_mask"])
        core = image_reward.net(g["pixel_values"], g["input_ids"], g["attention_mask"])
    torch.testing.assert_close(cls, g["cls_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(core.double(), g["scores"], atol=1e-5, rtol=0)
    # end to end from [0, 1] images: native-size renders (preprocessing is exact) ...
    small = g["images_small"].float() / 255
    torch.testing.assert_close(image_reward(small, prompts[:4]).double(), g["scores"][:4], atol=1e-5, rtol=0)
    # ... and one prompt against all images, the package's inference_rank path
    torch.testing.assert_close(image_reward(small, [prompts[0]] * 4).double(), g["rank_rewards_prompt0"][:4],
                               atol=1e-5, rtol=0)
    # a 40x48 image resized + cropped in torch instead of PIL: close, not exact
    big = g["image_big"].float() / 255
    assert_preprocess_close(image_reward.preprocess(big), g["pixel_values"][4:])
    torch.testing.assert_close(image_reward(big, prompts[4:]).double(), g["scores"][4:], atol=1e-2, rtol=0)


def test_image_reward_mapping_key_for_key(image_reward):
    from marval_rl.rewards.image_reward import map_checkpoint

    sd = torch.load(GOLDEN / "ImageReward.pt", weights_only=True)
    mapped, dropped, unmapped = map_checkpoint(sd)
    assert unmapped == []
    assert sorted(dropped) == sorted(["blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight",
                                      "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias"])
    assert sorted(mapped) == sorted(image_reward.net.state_dict())
    assert len(mapped) + len(dropped) == len(sd)
    own = image_reward.net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in mapped.items())
    assert image_reward.load_report["dropped"] == dropped


def test_image_reward_gradient(image_reward):
    g, meta = golden()
    x = (g["images_small"].float() / 255)[:2].clone().requires_grad_(True)
    image_reward(x, meta["prompts"][:2]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_image_reward_strict_loading_errors(tmp_path):
    kw = dict(med_config=str(GOLDEN / "med_config.json"), vocab=str(GOLDEN / "vocab.txt"), vision_heads=2)
    sd = torch.load(GOLDEN / "ImageReward.pt", weights_only=True)
    with pytest.raises(RewardError, match=r"checkpoint file not found: .*ImageReward\.pt"):
        build_reward("image_reward", checkpoint=str(tmp_path / "ImageReward.pt"), **kw)
    with pytest.raises(RewardError, match=r"med_config file not found"):
        build_reward("image_reward", checkpoint=str(GOLDEN / "ImageReward.pt"), med_config=str(tmp_path / "m.json"),
                     vocab=kw["vocab"])
    extra = dict(sd, **{"blip.itm_head.weight": torch.zeros(2, 64)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(RewardError, match=r"unmapped checkpoint keys \['blip.itm_head.weight'\]"):
        build_reward("image_reward", checkpoint=str(tmp_path / "extra.pt"), **kw)
    less = {k: v for k, v in sd.items() if k != "mlp.layers.6.bias"}
    torch.save(less, tmp_path / "less.pt")
    with pytest.raises(RewardError, match=r"missing model keys \['mlp.layers.6.bias'\]"):
        build_reward("image_reward", checkpoint=str(tmp_path / "less.pt"), **kw)
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"x": Path("/etc/passwd")}, fh, protocol=2)
    with pytest.raises(RewardError, match=r"could not read checkpoint|refusing to load"):
        build_reward("image_reward", checkpoint=str(tmp_path / "evil.pt"), **kw)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    with pytest.raises(RewardError, match=r"wrong vocab file"):
        build_reward("image_reward", checkpoint=str(GOLDEN / "ImageReward.pt"), med_config=kw["med_config"],
                     vocab=str(tmp_path / "vocab.txt"), vision_heads=2)
