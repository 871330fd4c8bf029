#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py) under a hard time limit; it installs and sets up nothing.
#   bench/gpu_check.sh                       # on a machine with one GPU: <= 8 minutes
#   bench/gpu_check.sh --dry                 # the same code on the CPU, tiny sizes
#   bench/gpu_check.sh --out runs/gpu_check/h100.json --parts train,mfu_eager
# Writes the JSON (default runs/gpu_check/gpu_check.json, rewritten after every part) and the table
# beside it (.txt). GPU_CHECK_TIMEOUT (seconds, default 480) bounds the whole run; PYTHON picks the
# interpreter (default: the project's .venv, else python on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3 || command -v python)"
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-480}" "$py" -m bench.gpu_check "$@"
