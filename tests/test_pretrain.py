"""`marval-rl pretrain`: a few real training steps per stage, exact resume, and bad input."""
import json
from pathlib import Path

import pytest
import torch

from marval_rl.cli import main
from marval_rl.config import load_recipe
from marval_rl.models.checkpoints import load_pretrained

TINY = ["data.per_class=2", "data.image_size=16", "pretrain.log_every=1", "pretrain.sample_every=0",
        "pretrain.vae.optim.batch_size=8", "pretrain.mar.optim.batch_size=8",
        "pretrain.vae.config.ch=16", "pretrain.vae.config.num_groups=8", "pretrain.vae.config.resolution=16",
        "pretrain.mar.config.img_size=16", "pretrain.mar.config.encoder_embed_dim=32",
        "pretrain.mar.config.decoder_embed_dim=32", "pretrain.mar.config.encoder_depth=1",
        "pretrain.mar.config.decoder_depth=1", "pretrain.mar.config.encoder_num_heads=2",
        "pretrain.mar.config.decoder_num_heads=2", "pretrain.mar.config.diffloss_w=32",
        "pretrain.mar.config.diffloss_d=1", "pretrain.mar.optim.warmup_steps=2", "data.augment=light"]


def run(tmp_path, *extra):
    recipe = Path(__file__).parents[1] / "recipes" / "pretrain_embedded.yaml"
    return main(["pretrain", str(recipe), *TINY, f"output_dir={tmp_path}", *extra])


def test_vae_then_mar_few_steps(tmp_path, capsys):
    rc = run(tmp_path, "pretrain.vae.optim.steps=3", "pretrain.mar.optim.steps=3",
             "pretrain.sample_every=3")
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["vae"]["step"] == 3 and summary["mar"]["step"] == 3
    vae = load_pretrained(tmp_path / "vae", expected="vae")
    teacher = load_pretrained(tmp_path / "teacher", expected="mar")
    assert vae.config.latent_scale > 0 and teacher.seq_len == 16  # 16 px / stride 4 -> 4x4 tokens
    assert (tmp_path / "samples" / "mar_samples_000003.png").is_file()
    assert (tmp_path / "samples" / "vae_recon_000003.png").is_file()
    lines = (tmp_path / "mar_metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_killed_run_resumes_exactly(tmp_path):
    """Stopping after 2 of 5 steps and running again ends with the same weights as 5 straight steps."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["pretrain.stages=[vae]", "pretrain.checkpoint_every=1"]
    assert run(straight, *common, "pretrain.vae.optim.steps=5") == 0
    assert run(split, *common, "pretrain.vae.optim.steps=2") == 0
    assert run(split, *common, "pretrain.vae.optim.steps=5") == 0
    a = load_pretrained(straight / "vae").state_dict()
    b = load_pretrained(split / "vae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x) for x in (straight / "vae_metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (split / "vae_metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]


def test_pretrain_bad_input(tmp_path, capsys):
    assert run(tmp_path, "pretrain.stages=[vea]") == 2
    assert "unknown stage" in capsys.readouterr().err
    assert run(tmp_path, "pretrain.stages=[mar]") == 2
    assert "needs a VAE" in capsys.readouterr().err
    assert run(tmp_path, "pretrain.stages=[vae]", "data.image_size=18") == 2
    assert "not divisible" in capsys.readouterr().err
    assert run(tmp_path, "data.source=imagenet") == 2
    assert "imagenet" in capsys.readouterr().err
