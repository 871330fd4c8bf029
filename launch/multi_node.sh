#!/usr/bin/env bash
# Several machines: run this on every node with the same MASTER_ADDR/MASTER_PORT and RUN_ID.
# torchrun's c10d rendezvous assigns node ranks; all nodes must see the same run directory (shared FS).
#   MASTER_ADDR=node0 NNODES=4 NPROC=8 RUN_ID=s2-001 launch/multi_node.sh pretrain/configs/less_b_s1s2.yaml
set -euo pipefail
CONFIG=${1:?usage: multi_node.sh CONFIG [key=value ...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR to the host of the rendezvous (any one node)}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:?set NNODES}
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}
RUN_ID=${RUN_ID:-gfm}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RUN_ID" \
  --max_restarts "${MAX_RESTARTS:-0}" \
  -m pretrain --config "$CONFIG" "$@"
