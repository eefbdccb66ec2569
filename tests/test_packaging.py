"""What a pip user gets: the built wheel holds the recipes, the rewards under marval_rl.rewards (never a
top-level `rewards`), the embedded assets; pyproject's package list matches the source folders."""
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_package_list_matches_the_folders():
    # a new sub-package missing from pyproject's explicit list would be absent from the wheel
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(cfg["packages"]), cfg["package-dir"]
    found = set()
    for init in ROOT.glob("marval_rl/**/__init__.py"):
        if "assets" not in init.parts:
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).glob("**/__init__.py"):
            found.add(".".join([pkg, *init.parent.relative_to(ROOT / folder).parts]))
    assert listed == found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # built from a copy of the sources: an in-tree build would leave build/ and *.egg-info in the checkout
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("marval_rl", "rewards", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=600)
    return zipfile.ZipFile(next(out.glob("marval_rl-*.whl")))


def test_wheel_ships_the_recipes_rewards_and_assets(wheel):
    names = set(wheel.namelist())
    recipes = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert recipes and {f"marval_rl/recipes/{r}" for r in recipes} <= names   # `marval-rl train quickstart`
    assert "marval_rl/rewards/base.py" in names and "marval_rl/rewards/examples/colorfulness.py" in names
    assert not any(n.startswith("rewards/") for n in names)                  # no top-level `rewards` to collide
    assert "marval_rl/assets/embedded/student/model.safetensors" in names    # the embedded default runs offline
