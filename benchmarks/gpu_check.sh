#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): sampling teacher vs student, one RL step of
# each kind with peak memory, a few GSIM steps; one table on stdout, progress on stderr.
#   bash benchmarks/gpu_check.sh                 # one GPU, MAR-B: under 8 minutes
#   bash benchmarks/gpu_check.sh --tiny          # CPU, the embedded models (a few minutes on 2 cores)
# PYTHON=path/to/python picks the interpreter (default: the project's .venv if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" benchmarks/gpu_check.py "$@"
