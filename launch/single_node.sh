#!/usr/bin/env bash
# One machine, N processes (one per GPU, or CPU processes when there is no GPU).
#   launch/single_node.sh pretrain/configs/cpu_smoke.yaml [key=value ...]
#   NPROC=8 launch/single_node.sh pretrain/configs/less_s_s2.yaml --resume auto
set -euo pipefail
CONFIG=${1:?usage: single_node.sh CONFIG [key=value ...]}; shift
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" -m pretrain --config "$CONFIG" "$@"
