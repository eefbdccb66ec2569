"""wandb (offline mode, the real library): run name, tags, one run continued across a resume, the
table of prompt / image / rewards, the fixed-eval summary and the policy artifact."""
import json
from pathlib import Path

import pytest

from test_rl import recipe, setup  # noqa: F401  (the tiny student / VAE fixture)

wandb = pytest.importorskip("wandb")


def _runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def test_wandb_offline_run_resumes_the_same_run(setup, tmp_path, monkeypatch):  # noqa: F811
    from marval_rl.rl.controller import run_training

    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "my-run"
    extra = ["train.wandb=offline", "train.iterations=2", "train.grid_every=1", "train.eval_per_class=1",
             "train.wandb_group=sweep-a"]
    run_training(recipe(setup, out, *extra), use_ray=False, progress=False, stop_after=1)
    run_training(recipe(setup, out, *extra), use_ray=False, progress=False)
    runs = _runs(out)
    assert len(runs) == 2
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    assert len(ids) == 1, f"a resumed run must continue the same wandb run, got ids {ids}"
    # the resumed run's record (wandb's offline .wandb file holds the protobuf records; their strings are
    # plain bytes): run name from the folder, group, tags, the fixed-eval summary, the policy artifact
    record = next(runs[-1].glob("run-*.wandb")).read_bytes()
    for needle in (b"my-run", b"sweep-a", b"reward_gradient", b"Brightness", b"eval_first/reward/total",
                   b"eval_last/reward/total", b"eval_gain_sigma/reward/total", b"policy-" + ids.pop().encode()):
        assert needle in record, needle
    # the table of prompt / image / rewards at grid iterations
    files = runs[-1] / "files"
    tables = list(files.glob("media/table/rollouts/table_*.table.json"))
    assert tables
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["class", "prompt", "image"] and "reward/total" in table["columns"]
    assert len(table["data"]) == 8                          # 2 workers x 4 rollouts
    assert list(files.glob("media/images/eval/before_after_*.png"))   # the before/after sheet
