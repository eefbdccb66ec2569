"""Recipes (typed, validated, overridable) and the ``marval-rl`` CLI."""
import json
from pathlib import Path

import pytest
import torch

from marval_rl.cli import main
from marval_rl.config import Recipe, RecipeError, load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


def test_defaults_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("sample:\n  cfg: 2.9\n  labels: [1, 2]\n")
    r = load_recipe(p, ["sample.num_iter=8", "device=cpu"])
    assert isinstance(r, Recipe)
    assert r.sample.cfg == 2.9 and r.sample.labels == [1, 2] and r.sample.num_iter == 8
    assert r.sample.temperature == 1.0  # untouched default from the dataclass


def test_unknown_key_names_closest_valid_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("sample:\n  num_iters: 8\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'sample.num_iters' \(did you mean 'sample.num_iter'\?\)"):
        load_recipe(p)
    with pytest.raises(RecipeError, match=r"did you mean 'sample.temperature'"):
        load_recipe(None, ["sample.temprature=0.9"])
    with pytest.raises(RecipeError, match=r"unknown recipe key 'modle'.*did you mean 'model'"):
        load_recipe(None, ["modle.checkpoint=x"])


def test_wrong_type_names_the_key():
    with pytest.raises(RecipeError, match="sample.num_iter"):
        load_recipe(None, ["sample.num_iter=many"])
    with pytest.raises(RecipeError, match="model.ema"):
        load_recipe(None, ["model.ema=perhaps"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["sample.cfg"])
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe("/nonexistent.yaml")


def test_recipe_dir_interpolation():
    r = load_recipe(RECIPES / "sample_reference_tiny.yaml")
    assert Path(r.model.checkpoint).is_file()


def test_validate_prints_resolved_recipe(capsys):
    assert main(["validate", str(RECIPES / "sample_reference_tiny.yaml"), "sample.cfg=3.0"]) == 0
    out = capsys.readouterr().out
    assert "cfg: 3.0" in out and "num_iter: 4" in out and "temperature: 1.0" in out


def test_cli_reports_bad_recipe_key(capsys):
    assert main(["validate", str(RECIPES / "sample_reference_tiny.yaml"), "sample.cgf=3"]) == 2
    assert "did you mean 'sample.cfg'" in capsys.readouterr().err


def test_sample_writes_grid_and_pngs(tmp_path, capsys):
    """End to end on the reference tiny MAR + a small VAE saved in the project's own format."""
    from marval_rl.models import AutoencoderKL, VAEConfig, save_pretrained

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_groups=8, attn_resolutions=()))
    save_pretrained(vae, tmp_path / "vae")
    out = tmp_path / "out"
    rc = main(["sample", str(RECIPES / "sample_reference_tiny.yaml"), f"vae.checkpoint={tmp_path / 'vae'}",
               f"output_dir={out}", "sample.num_per_label=2", "sample.batch_size=3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_images"] == 8
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 8 and pngs[0].name == "00000_class0.png"
    from PIL import Image
    assert Image.open(out / "grid.png").size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)
    lat = torch.load(out / "latents.pt", weights_only=True)
    assert lat["latents"].shape == (8, 16, 4, 4) and lat["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_sample_bad_inputs(tmp_path, capsys):
    recipe = str(RECIPES / "sample_reference_tiny.yaml")
    assert main(["sample", recipe, "sample.labels=[10]", f"output_dir={tmp_path}"]) == 2
    assert "labels must lie in [0, 10)" in capsys.readouterr().err
    assert main(["sample", recipe, "sample.num_iter=0", f"output_dir={tmp_path}"]) == 2
    assert "num_iter must be in [1, 16]" in capsys.readouterr().err
    assert main(["sample", recipe, "sample.cfg=0.5", f"output_dir={tmp_path}"]) == 2
    assert "values below 1 are not meaningful" in capsys.readouterr().err
    assert main(["sample", recipe, "model.checkpoint=/no/such.pth", f"output_dir={tmp_path}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
