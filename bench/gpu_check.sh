#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py) under a hard time limit.
#   bash bench/gpu_check.sh                  # on a machine with one GPU: <= 8 minutes
#   bash bench/gpu_check.sh --dry            # the same code on the CPU, tiny sizes
#   bash bench/gpu_check.sh --dry-if-no-gpu  # the GPU run, or the dry one where torch sees no CUDA device
#   bash bench/gpu_check.sh --out runs/gpu_check/h100.json --parts train,mfu_eager
# First it installs, from bench/wheels/ (gathered beforehand with `.venv/bin/python -m bench.gpu_wheels`
# where a package registry can be reached, and carried along), the wheels this interpreter lacks
# (DeepSpeed, webdataset, rasterio, ...) into a scratch folder on PYTHONPATH, and checks every import the
# parts need; a missing wheel, module or GPU stops it with one line and exit code 2 before any part runs.
# Writes the JSON (default runs/gpu_check/gpu_check.json, rewritten after every part) and the table
# beside it (.txt). GPU_CHECK_TIMEOUT (seconds, default 480) bounds the whole run; PYTHON picks the
# interpreter (default: the project's .venv, else python3 on PATH, as on a lent GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3 || command -v python)"
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-480}" "$py" -m bench.gpu_check "$@"
