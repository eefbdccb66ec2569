"""The run's report.html and run record: written by the run, rebuilt from the folder, every part there."""
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from marval_rl.rl.controller import run_training
from marval_rl.rl.report import build_report
from test_rl import recipe, setup  # noqa: F401  (the tiny student / VAE fixture)


class Page(HTMLParser):
    """Headings, images (with their src scheme), tables (header cells, rows) and <pre> text of a page."""

    def __init__(self):
        super().__init__()
        self.headings, self.images, self.tables, self.pre = [], [], [], ""
        self._tag = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append((a.get("alt"), a.get("src", "")[:22]))
        if tag == "table":
            self.tables.append({"class": a.get("class"), "header": [], "rows": 0})
        if tag == "tr" and self.tables:
            self.tables[-1]["rows"] += 1
        self._tag = tag

    def handle_data(self, data):
        if self._tag in ("h1", "h2") and data.strip():
            self.headings.append(data.strip())
        if self._tag == "th" and self.tables:
            self.tables[-1]["header"].append(data.strip())
        if self._tag == "pre":
            self.pre += data


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text())
    return p


def test_run_writes_a_self_contained_report_and_its_record(setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    run_training(recipe(setup, out, "train.iterations=3", "train.eval_per_class=2", "train.eval_every=2",
                        "train.grid_every=0"), use_ray=False, progress=False)
    page = parse(out / "report.html")
    # every part a person looks for (a report that lost one of them fails here)
    for h in ("Fixed evaluation set", "Rewards", "Before / after: the same prompts and seeds", "Per class",
              "Step time", "Settings"):
        assert h in page.headings, (h, page.headings)
    assert any(h.startswith("Latest rollouts") for h in page.headings)   # the final grid, although grid_every=0
    # images inlined (self-contained: no file or http reference)
    assert page.images and all(src.startswith("data:image/png;base64") for _, src in page.images)
    summary_table = next(t for t in page.tables if t["class"] == "summary")
    assert summary_table["header"][:3] == ["metric", "before", "after"] and summary_table["rows"] >= 3
    per_class = next(t for t in page.tables if t["class"] == "per-class")
    assert per_class["rows"] == 1 + 10                                  # header + the 10 eval classes
    assert "train:" in page.pre and "iterations: 3" in page.pre         # the settings are the resolved recipe
    # the fixed-eval points behind the before/after: start, the eval_every point, the end
    assert sorted(p.name for p in (out / "eval").glob("iter_*")) == [
        "iter_00000.safetensors", "iter_00002.safetensors", "iter_00003.safetensors"]
    assert (out / "grids" / "iter_00003.png").is_file()
    # the printed summary is the fixed-eval table, not single rollout batches
    printed = capsys.readouterr().out
    assert "| metric | before | after | real images | gain (sigma) | gap closed |" in printed
    # the run record: the resolved recipe and the version that wrote the folder
    assert "iterations: 3" in (out / "recipe.yaml").read_text()
    assert json.loads((out / "run.json").read_text())["version"] not in ("", None)
    # rebuilt from the folder alone, e.g. after the run or while it runs
    (out / "report.html").unlink()
    (out / "summary.json").unlink()
    page = parse(build_report(out))
    assert "Before / after: the same prompts and seeds" in page.headings
    assert "in progress" in (out / "report.html").read_text()


def test_report_of_a_folder_without_a_run_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no RL run"):
        build_report(tmp_path)


def test_rerun_with_another_recipe_refuses_naming_the_keys(setup, tmp_path):  # noqa: F811
    from marval_rl.config import RecipeError

    out = tmp_path / "run"
    run_training(recipe(setup, out, "train.iterations=1"), use_ray=False, progress=False)
    # the iteration count may change on resume ...
    run_training(recipe(setup, out, "train.iterations=2"), use_ray=False, progress=False)
    # ... the algorithm may not: it would continue one run's state as another's and report one mixed run
    with pytest.raises(RecipeError, match=r"train.algorithm \('reward_gradient' -> 'policy_gradient'\)"):
        run_training(recipe(setup, out, "train.iterations=3", "train.algorithm=policy_gradient"), use_ray=False,
                     progress=False)
