"""The GPU check runs end to end at its CPU size, so the script handed to a GPU session is known to work."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_prints_every_part(tmp_path):
    # catches: a part that crashes (a renamed API, a recipe key), rows missing from the one table, and
    # timing wired to the wrong generator (the one-step student must beat the 100-step teacher by far)
    import json

    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--no-compile",
                          "--json", str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    parts = [r["part"] for r in rows]
    assert parts.count("sampling") == 8 and parts.count("rl") == 8 and parts.count("distill") == 2
    assert not [r["what"] for r in rows if r["seconds"] is None]      # no part failed or timed out
    assert all(r["seconds"] > 0 for r in rows)
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)
    for r in rows:
        if r["part"] == "sampling" and r["precision"] == "fp32" and r["what"].startswith("student"):
            assert r["ratio"] > 3, r


def test_gpu_check_reports_a_stopped_part_and_runs_the_rest(tmp_path):
    # catches: one slow or broken part (a long compilation on a GPU) taking the whole check down with it,
    # so a short GPU session ends with no table: the sampling part stopped at its limit must become a
    # row saying so, and the RL and GSIM rows must still come
    import json

    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--no-compile",
                          "--sampling-limit-s", "1", "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    stopped = [r for r in rows if r["part"] == "sampling"]
    assert len(stopped) == 1 and "stopped at the 1.0 s limit" in stopped[0]["what"], stopped
    assert [r["part"] for r in rows].count("rl") == 8 and [r["part"] for r in rows].count("distill") == 2
    assert any("stopped at the 1.0 s limit" in line for line in out.stdout.splitlines() if line.startswith("| "))


def test_gpu_memory_estimate_counts_saved_bytes_and_parameters():
    # catches: counting a storage once per saving op (x is saved by both the mul and the sin here), or
    # missing one; and parameter counts drifting from the released sizes (docs/gpu.md's table)
    import torch

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from gpu_memory_estimate import counts, saved_bytes

    x, w = torch.randn(1000, requires_grad=True), torch.randn(1000, requires_grad=True)
    # mul saves x and w, sin saves x again (same storage), the sum saves nothing: 2 x 1000 float32
    assert saved_bytes(lambda: ((x * w).sum() + x.sin().sum()).backward()) == 2 * 1000 * 4
    c = counts()
    # MAR-B: 208M in the MAR paper; the one-step student has the teacher's size
    assert round(c["mar_base"]["teacher"] / 1e6) == 208
    for v in c.values():
        assert v["student"] == v["teacher"] and v["head"] + v["backbone"] == v["teacher"]
