#!/usr/bin/env bash
# N processes on this machine (e.g. one per GPU, or CPU processes to try multi-process training):
# process 0 coordinates on localhost; CPU processes exchange gradients through gloo.
# Usage: launch/train_processes_local.sh N CONFIG WORKDIR [--config.* overrides]
set -euo pipefail
count=${1:?usage: $0 N CONFIG WORKDIR [--config.* overrides]}
config=${2:?usage: $0 N CONFIG WORKDIR [--config.* overrides]}
workdir=${3:?usage: $0 N CONFIG WORKDIR [--config.* overrides]}
shift 3
port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0))
print(s.getsockname()[1])")
pids=()
for ((id = 0; id < count; id++)); do
  python -m crystal_vae.main --jax_distributed --coordinator_address="127.0.0.1:$port" \
    --num_processes="$count" --process_id="$id" --config="$config" --workdir="$workdir" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
