"""`marval-rl evaluate`'s generation is a fixed (class, seed) item list in chunks (marval_rl/eval/sharded.py):
a killed evaluation resumes to exactly the uninterrupted result, and 2 torchrun ranks (gloo, CPU) give the
features and FD-proxy of 1 process. Embedded models (quickstart_student), tiny counts."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from marval_rl.cli import main
from marval_rl.eval import sharded

# 8 images of 4 classes in 4 chunks of 2 (2 ranks: two rounds), K = 2 AR steps
ARGS = ["quickstart_student", "evaluate.classes=[0,1,2,3]", "evaluate.num_images=8", "evaluate.save_every=2",
        "evaluate.batch_size=2", "sample.num_iter=2"]


def chunks(out):
    return [load_file(str(sharded.chunk_path(out / "evaluate", k))) for k in range(4)]


def result(out):
    row = json.loads((out / "evaluate" / "evaluate.json").read_text())
    return {k: row[k] for k in ("images", "fid_proxy", "classifier_acc")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "whole"
    assert main(["evaluate", *ARGS, f"output_dir={out}"]) == 0
    return out


def test_item_list_is_class_balanced_and_fixed():
    # catches: classes drawn at random per run, or a list that depends on the chunking
    labels = sharded.item_labels([3, 5, 9], 12)
    assert sorted(labels) == [3] * 4 + [5] * 4 + [9] * 4 and labels[:3] == [3, 5, 9]
    assert sharded.chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert len({sharded.chunk_seed(0, k) for k in range(1000)}) == 1000


def test_killed_evaluation_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, monkeypatch, capsys):
    # catches: a resumed run regenerating done chunks (or skipping undone ones), a chunk's images depending
    # on what ran before it in the process (one generator for the whole run), chunks concatenated out of order
    out = tmp_path / "killed"
    save, saved = sharded._save, []

    def save_then_die(o, k, outputs):
        if len(saved) == 2:
            raise KeyboardInterrupt         # killed after two chunks reached the disk
        save(o, k, outputs)
        saved.append(k)

    monkeypatch.setattr(sharded, "_save", save_then_die)
    assert main(["evaluate", *ARGS, f"output_dir={out}"]) == 130       # Ctrl-C: one line, the chunks kept
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    assert sharded.done_chunks(out / "evaluate", 4) == [0, 1] and not (out / "evaluate" / "evaluate.json").exists()
    monkeypatch.setattr(sharded, "_save", save)
    made = []
    import marval_rl.eval.evaluate as ev

    generate = ev.generate_images
    monkeypatch.setattr(ev, "generate_images", lambda *a, **k: (made.append(len(a[2])), generate(*a, **k))[1])
    capsys.readouterr()
    assert main(["evaluate", *ARGS, f"output_dir={out}"]) == 0
    assert "resuming: 2 of 4 chunks are done" in capsys.readouterr().out
    assert made == [2, 2]                   # only the two missing chunks were generated
    for a, b in zip(chunks(out), chunks(uninterrupted)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "seconds")
    assert result(out) == result(uninterrupted)


def test_rerun_of_another_recipe_into_the_folder_is_refused(uninterrupted, capsys):
    # catches: chunks of one recipe mixed with another's (e.g. another cfg) into one FID
    assert main(["evaluate", *ARGS, "sample.cfg=2.0", f"output_dir={uninterrupted}"]) == 2
    assert "sample.cfg" in capsys.readouterr().err


def test_rerun_after_a_scored_file_changed_is_refused(tmp_path, capsys):
    # catches: a rerun into the folder reporting the old chunks after the weights or statistics it scored
    # with were replaced under the same path (a retrained model, recomputed statistics)
    import os
    import shutil

    from marval_rl.config import asset_path

    stats = tmp_path / "fid"
    shutil.copytree(asset_path("embedded/fid"), stats)
    args = ["evaluate", "quickstart_student", "evaluate.classes=[0,1]", "evaluate.num_images=2", "sample.num_iter=2",
            f"evaluate.fid_stats={stats}", f"output_dir={tmp_path / 'run'}"]
    assert main(args) == 0
    assert main(args) == 0                  # unchanged: resumes (nothing left to do) and reports again
    f = stats / "stats.safetensors"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(args) == 2
    assert "other files under evaluate.fid_stats" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_two_torchrun_ranks_equal_one_process(uninterrupted, tmp_path):
    # catches: ranks generating the same chunks (duplicates, missing items), rank-dependent seeds, rank > 0
    # writing, features gathered out of rank order
    out = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MARVAL_DIST_BACKEND": "gloo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "marval_rl.cli", "evaluate", *ARGS, f"output_dir={out}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["world_size"] == 2 and proc.stdout.count('"world_size"') == 1   # rank 0 alone reports
    for a, b in zip(chunks(out), chunks(uninterrupted)):
        assert all(torch.equal(a[k], b[k]) for k in a if k != "seconds")
    ours, one = result(out), result(uninterrupted)
    # identical features; the FD's float64 eigensolver runs with 1 thread here and several in the test process,
    # so its round-off differs: ~d eps |S| per eigenvalue, and the ~120 zero eigenvalues of an 8-sample
    # covariance (128-d) pass it through a square root: ~120 sqrt(128 eps |S|) ~ 1e-7 of FD; bound 1e-6
    assert ours.pop("fid_proxy") == pytest.approx(one.pop("fid_proxy"), rel=1e-6)
    assert ours == one
