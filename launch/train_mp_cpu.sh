#!/usr/bin/env bash
# The Materials Project (CGCNN's CSV, seeded 0.8/0.1/0.1 split, cells < 10 Å, <= 64 atoms) on a
# 2-core CPU: configs/<representation>.py:mp_cpu. Checkpoints every 250 steps; running the same
# command again resumes from WORKDIR's latest checkpoint, so a run is carried on by keeping
# WORKDIR (e.g. under ~/runs/) and running it again.
# Usage: launch/train_mp_cpu.sh repeat|unit_cell MP_DIR WORKDIR [extra --config.* overrides]
set -euo pipefail
representation=${1:?usage: $0 repeat|unit_cell MP_DIR WORKDIR [--config.* overrides]}
data=${2:?usage: $0 repeat|unit_cell MP_DIR WORKDIR [--config.* overrides]}
workdir=${3:?usage: $0 repeat|unit_cell MP_DIR WORKDIR [--config.* overrides]}
shift 3
cd "$(dirname "$0")/.."
python -m crystal_vae.main --config="configs/$representation.py:mp_cpu" --workdir="$workdir" \
  --config.dataset.path="$data" "$@"
