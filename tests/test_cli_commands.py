"""The CLI around the runs: --version, recipes by name, `recipes` / `recipes --copy`, `report`, and the
deliberate resume (`--overwrite`)."""
import json
from pathlib import Path

from marval_rl.cli import main
from marval_rl.config import recipe_to_yaml
from test_rl import recipe, setup  # noqa: F401  (the tiny student / VAE fixture)


def test_version_and_recipes(capsys, tmp_path, monkeypatch):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("marval-rl ")
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "quickstart " in listing and "The main job on the embedded default" in listing   # name + purpose
    monkeypatch.chdir(tmp_path)           # found by name from any directory, not only the repo
    assert main(["validate", "quickstart"]) == 0 and "embedded_clip" in capsys.readouterr().out
    assert main(["recipes", "--copy", "quickstart", str(tmp_path)]) == 0
    assert (tmp_path / "quickstart.yaml").read_text().startswith("# The main job")
    assert main(["recipes", "--copy", "quickstart", str(tmp_path)]) == 2    # never overwrites an edit
    assert main(["validate", "quikstart"]) == 2
    assert "did you mean 'quickstart'" in capsys.readouterr().err


def test_rerun_overwrite_and_report(setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(recipe_to_yaml(recipe(setup, out, "train.iterations=1")))
    assert main(["train", str(path), "--no-ray"]) == 0
    # the same folder with another algorithm: refused, naming the key (it used to continue the state)
    assert main(["train", str(path), "--no-ray", "train.algorithm=policy_gradient"]) == 2
    err = capsys.readouterr().err
    assert "train.algorithm" in err and "--overwrite" in err
    assert main(["train", str(path), "--no-ray", "train.algorithm=policy_gradient", "--overwrite"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "pg/clip_frac" in rows[0]                     # a fresh policy-gradient run
    assert "algorithm: policy_gradient" in (out / "recipe.yaml").read_text()
    (out / "report.html").unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert Path(capsys.readouterr().out.strip()) == out / "report.html" and (out / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    # --resume PATH continues another folder's state into a new output_dir (its history comes along)
    more = tmp_path / "more"
    assert main(["train", str(path), "--no-ray", "train.algorithm=policy_gradient", "train.iterations=2",
                 f"output_dir={more}", "--resume", str(out)]) == 0
    rows = [json.loads(x) for x in (more / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert main(["train", str(path), "--no-ray", f"output_dir={tmp_path / 'x'}", "--resume", str(tmp_path / "none")]) == 2
    assert "no train state there" in capsys.readouterr().err


def test_download_command_lists_and_refuses_unknown_names(capsys):
    assert main(["download", "--list"]) == 0
    assert "mar_base" in capsys.readouterr().out
    assert main(["download", "no_such_weights"]) == 2            # one line naming the known names
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_weights" in err[0] and "mar_base" in err[0]


import pytest  # noqa: E402


@pytest.mark.parametrize("override, named", [
    ("train.algorithm=ppo", "train.algorithm"),          # validate used to accept any algorithm string
    ("device=gpu", "device"),                            # ... any device string
    ("train.wandb=on", "train.wandb"),                   # ... and YAML's boolean `on` as a wandb mode
    ("train.rewards=[{name: nope}]", "train.rewards"),   # reward names resolved at validate time
    ("train.gold=[{name: /no/such.py:X}]", "/no/such.py"),  # and reward files
    ("sample.labels=[lio]", "lion"),                     # class names: an unknown one names the closest
])
def test_validate_is_strict(override, named, capsys):
    assert main(["validate", "quickstart", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and named in err[0], err


def test_class_names_where_class_ids_are(tmp_path, capsys):
    # `sample.labels=[lion]` used to be a raw int() error; names and ids mix
    assert main(["sample", "quickstart_student", "sample.labels=[lion, Tiger, 5]", "sample.num_iter=2",
                 f"output_dir={tmp_path}"]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "00000_class0.png", "00001_class1.png", "00002_class5.png"]


def test_every_shipped_recipe_validates(capsys):
    from marval_rl.config import shipped_recipes

    for name in shipped_recipes():
        assert main(["validate", name]) == 0, (name, capsys.readouterr().err)
