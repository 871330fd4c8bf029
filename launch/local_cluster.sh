#!/usr/bin/env bash
# N "nodes" × M processes on one machine over loopback: the multi-node code path without a cluster
# (gloo on CPU; what the tests do). Each "node" is its own torchrun launcher with its own node rank.
# Needs `python` and `torchrun` of the project's environment on PATH (an activated venv).
#   NODES=2 NPROC=1 launch/local_cluster.sh pretrain/configs/cpu_smoke.yaml run_dir=runs/local2x1
# NODES and NPROC default to 2 and 1; MASTER_PORT defaults to a free loopback port below 32768.
set -euo pipefail
CONFIG=${1:?usage: local_cluster.sh CONFIG [key=value ...]}; shift
NODES=${NODES:-2}
NPROC=${NPROC:-1}
# A free port below Linux's ephemeral range (32768-60999): node 1 starts connecting before node 0 listens,
# and a client retrying a port inside that range can be given the same port as its own source and connect
# to itself (TCP simultaneous open), which then blocks node 0's listen with EADDRINUSE.
MASTER_PORT=${MASTER_PORT:-$(python - <<'PY'
import random, socket
for port in random.sample(range(20000, 32768), 500):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
PY
)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pids=()
# stopping the script (Ctrl-C, a test's timeout) stops every launcher it started
trap 'kill "${pids[@]}" 2>/dev/null; exit 130' INT TERM
for ((node = 0; node < NODES; node++)); do
  torchrun --nnodes "$NODES" --nproc_per_node "$NPROC" --node_rank "$node" \
    --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
    -m pretrain --config "$CONFIG" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
