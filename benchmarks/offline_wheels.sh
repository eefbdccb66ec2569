#!/usr/bin/env bash
# The wheels the GPU check needs beyond a CUDA machine's usual image (torch, torchvision, transformers,
# timm, safetensors, numpy, pyyaml, tqdm, matplotlib, torchmetrics, huggingface_hub, regex), for a
# machine with no network: download them here, copy the folder over, then
#   WHEELS=offline_wheels bash benchmarks/gpu_check.sh
# The check does not import Ray; gpu_check.sh builds the project itself from the checkout when it is not installed.
#   bash benchmarks/offline_wheels.sh [DIR] [PYTHON_VERSION]     # default: offline_wheels, 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-offline_wheels}
PYV=${2:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" omegaconf==2.4.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
    setuptools==80.9.0 wheel==0.45.1     # to build the checkout there (gpu_check.sh) if its own are old
ls -1 "$DIR"
