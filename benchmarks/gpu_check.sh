#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): sampling teacher vs student, one RL step of
# each kind with peak memory, a few GSIM steps; one table on stdout, progress on stderr.
#   bash benchmarks/gpu_check.sh                 # one GPU, MAR-B: under 8 minutes
#   bash benchmarks/gpu_check.sh --tiny          # CPU, the embedded models (a few minutes on 2 cores)
# PYTHON=path/to/python picks the interpreter (default: the project's .venv if present, else python3).
set -euo pipefail
# paths the caller gave relative to where they stand, resolved before the cd below
[ -n "${WHEELS:-}" ] && WHEELS=$(realpath "$WHEELS")
# (not realpath for the interpreter: a venv's python is a symlink whose target is outside the venv)
[ -n "${PYTHON:-}" ] && [[ "$PYTHON" == */* ]] && PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
cd "$(dirname "$0")/.."
# WHEELS=dir installs the wheels in dir (benchmarks/offline_wheels.sh) into a scratch folder first, for a
# machine with torch but no network; a checkout that is not installed is built into that folder from
# here (no network: --no-index, the interpreter's own setuptools), since rewards/ and recipes/ only
# become marval_rl.rewards / marval_rl.recipes through pyproject.toml's package-dir.
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}
SITE=""
if [ -n "${WHEELS:-}" ]; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
fi
# is the project installed? (sys.path[0] is this folder for -c: dropped, so the checkout cannot answer)
if ! PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import sys; sys.path.pop(0); import marval_rl.rewards" \
        2>/dev/null; then
    SITE=${SITE:-$(mktemp -d)}
    # built from a copy (setuptools' build/ folder would otherwise stay in the checkout, and a stale one
    # ships deleted modules), with the scratch folder first on the path so offline_wheels' setuptools serves
    SRC=$(mktemp -d)
    cp -r pyproject.toml README.md marval_rl rewards recipes "$SRC/"
    if ! (cd "$SRC" && PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pip install -q --no-index --no-deps \
            --no-build-isolation --no-compile --no-cache-dir --target "$SITE" . >&2); then
        echo "gpu_check.sh: could not build the checkout (no setuptools/wheel?); using its folders as" \
             "pyproject.toml's package-dir maps them" >&2
        cp -r marval_rl "$SITE/" && cp -r rewards "$SITE/marval_rl/rewards" && cp -r recipes "$SITE/marval_rl/recipes"
    fi
fi
[ -n "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
