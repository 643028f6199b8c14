#!/usr/bin/env bash
# One host, every GPU it has: one process; the global batch is split over the local GPUs on the
# mesh's `data` axis (config.batch_size must be divisible by the number of GPUs).
# Usage: launch/train_gpus.sh CONFIG WORKDIR [--config.* overrides]
#   e.g. launch/train_gpus.sh configs/repeat.py runs/paper_repeat --config.dataset.name=perov_5 \
#          --config.dataset.path=../shared/data/perov_5
# Re-running the same command resumes from WORKDIR's latest checkpoint.
set -euo pipefail
config=${1:?usage: $0 CONFIG WORKDIR [--config.* overrides]}
workdir=${2:?usage: $0 CONFIG WORKDIR [--config.* overrides]}
shift 2
python -m crystal_vae.main --config="$config" --workdir="$workdir" "$@"
python -m crystal_vae.learning_curves "$workdir"
