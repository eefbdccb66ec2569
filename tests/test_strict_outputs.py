"""What a run writes is sound: no NaN weights saved, every JSON strictly valid, no environment read by a
recipe. Each test fails on the code before its fix (named in its comment)."""
import json
from pathlib import Path

import pytest

from marval_rl import strict_json
from marval_rl.cli import main
from test_rl import recipe, setup  # noqa: F401  (module fixture)

RULES = Path(__file__).parent / "fixtures" / "user_rules" / "nan_rule.py"


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as jq, JSON.parse and every non-Python parser do."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_strict_dumps_writes_null_for_non_finite_numbers():
    # json.dumps writes NaN / Infinity, which strict parsers reject (the probe's summary.json held Infinity)
    text = strict_json.dumps({"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": (2, "x")})
    assert strict_loads(text) == {"a": None, "b": [1.5, None, None], "c": [2, "x"]}
    with pytest.raises(TypeError):                      # anything else that is not JSON still raises
        strict_json.dumps({"d": object()})


@pytest.mark.parametrize("rule", ["NaNLoss", "NaNWeights"])
def test_a_nan_update_stops_the_run_before_anything_is_saved(setup, tmp_path, capsys, rule):  # noqa: F811
    # before: with one iteration the run exited 0 and saved policy/ with NaN tensors; with two it blamed the
    # reward ("images contain NaN/Inf")
    from marval_rl.config import recipe_to_yaml

    r = recipe(setup, tmp_path / "run", f"train.algorithm='{RULES}:{rule}'", "train.iterations=1",
               "train.eval_per_class=0")
    (tmp_path / "r.yaml").write_text(recipe_to_yaml(r))
    code = main(["train", str(tmp_path / "r.yaml"), "--no-ray"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and err[-1].startswith("error: train.algorithm=") and \
        ("non-finite" in err[-1] or "loss is nan" in err[-1]), err[-3:]
    assert not (tmp_path / "run" / "policy").exists() and not (tmp_path / "run" / "rl_state.pt").exists()


def test_every_line_and_file_a_run_writes_is_strict_json(setup, tmp_path, capsys):  # noqa: F811
    # before: a rule's NaN metric wrote `NaN` into metrics.jsonl, and the last stdout line and
    # summary.json could hold NaN / Infinity
    from marval_rl.rl.controller import run_training

    run_training(recipe(setup, tmp_path, f"train.algorithm='{RULES}:NaNMetric'", "train.iterations=2"),
                 use_ray=False, progress=False)
    rows = [strict_loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["my/nan"] is None and r["my/inf"] is None for r in rows)
    strict_loads((tmp_path / "summary.json").read_text())
    strict_loads((tmp_path / "run.json").read_text())
    strict_loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_recipe_may_not_read_the_environment(tmp_path, capsys, monkeypatch):
    # before: ${oc.env:VAR} resolved, so a recipe from elsewhere could copy a secret into recipe.yaml,
    # the logs and wandb
    monkeypatch.setenv("MARVAL_TEST_SECRET", "hunter2")
    (tmp_path / "r.yaml").write_text("output_dir: ${oc.env:MARVAL_TEST_SECRET}\n")
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "recipe key 'output_dir'" in err[0] and "environment variable" in err[0]
    assert main(["validate", "quickstart", "sample.seed=${oc.env:MARVAL_TEST_SECRET}"]) == 2   # overrides too
    monkeypatch.setenv("MARVAL_RL_RECIPE_ENV", "1")                                    # the opt-in
    from marval_rl.config import load_recipe

    assert load_recipe(str(tmp_path / "r.yaml")).output_dir == "hunter2"
