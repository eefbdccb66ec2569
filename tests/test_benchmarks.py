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
    assert all(r["seconds"] > 0 for r in rows)
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)
    for r in rows:
        if r["part"] == "sampling" and r["precision"] == "fp32" and r["what"].startswith("student"):
            assert r["ratio"] > 3, r
