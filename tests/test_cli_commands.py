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


# every shipped recipe through `validate`: tests/test_recipe_files.py (a GPU recipe exits 2 here, naming the
# files it lacks, and nothing else)


def test_findings_of_the_second_probe(setup, tmp_path, capsys):  # noqa: F811
    """Each line is a defect an independent probe found after the first round of fixes."""
    import torch
    from safetensors.torch import load_file, save_file

    # --overwrite into a user's folder that merely holds an `eval/`: refused, nothing deleted (data loss)
    user = tmp_path / "proj"
    (user / "eval").mkdir(parents=True)
    (user / "eval" / "my_script.py").write_text("print(1)")
    path = tmp_path / "r.yaml"
    path.write_text(recipe_to_yaml(recipe(setup, user, "train.iterations=1")))
    assert main(["train", str(path), "--no-ray", "--overwrite"]) == 2
    assert (user / "eval" / "my_script.py").is_file() and "run record" in capsys.readouterr().err
    # `sample` into a train run's folder would overwrite that run's record: refused
    run = tmp_path / "run"
    path.write_text(recipe_to_yaml(recipe(setup, run, "train.iterations=1")))
    assert main(["train", str(path), "--no-ray"]) == 0
    assert main(["sample", str(path), "sample.num_iter=2", "sample.labels=[0]"]) == 2
    assert "holds a `marval-rl train` run" in capsys.readouterr().err
    # NaN weights: refused at load, naming the file (sample exited 0 with black images; evaluate segfaulted)
    nan = tmp_path / "nan_student"
    import shutil
    shutil.copytree(setup / "student", nan)
    sd = load_file(str(nan / "model.safetensors"))
    sd[next(iter(sd))] = torch.full_like(sd[next(iter(sd))], float("nan"))
    save_file(sd, str(nan / "model.safetensors"))
    assert main(["sample", str(path), f"model.checkpoint={nan}", f"output_dir={tmp_path / 's'}",
                 "sample.num_iter=2", "sample.labels=[0]"]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "model.safetensors" in err and not (tmp_path / "s").exists()
    # an unreachable cluster: one line at once (Ray retried for minutes, naming another address)
    assert main(["train", str(path), f"output_dir={tmp_path / 'z'}", "train.ray_address=127.0.0.1:1"]) == 2
    assert "train.ray_address=127.0.0.1:1" in capsys.readouterr().err
    # `report` of a folder whose log is garbage: no traceback
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "metrics.jsonl").write_bytes(bytes(range(256)))
    assert main(["report", str(junk)]) == 0
    # a usage mistake is one line too
    import pytest
    with pytest.raises(SystemExit) as e:
        main(["train", "--bogus"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
