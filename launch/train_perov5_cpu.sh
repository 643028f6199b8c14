#!/usr/bin/env bash
# The repeat model on perov_5 at the paper's 30³ grid, with widths small enough for a 2-core CPU.
# Usage: launch/train_perov5_cpu.sh WORKDIR [STEPS] [extra --config.* overrides]
set -euo pipefail
workdir=${1:?usage: $0 WORKDIR [STEPS]}
steps=${2:-3000}
shift $(( $# < 2 ? $# : 2 ))
data=${PEROV5_DIR:-$(dirname "$0")/../../shared/data/perov_5}
python -m crystal_vae.main --config=configs/repeat.py:quick --workdir="$workdir" \
  --config.dataset.name=perov_5 --config.dataset.path="$data" \
  --config.voxel.grid=30 \
  --config.model.latent_dim=64 \
  --config.model.encoder_features='(8, 16, 32, 32)' \
  --config.model.decoder_start=5 \
  --config.model.decoder_features='(32, 16, 8)' \
  --config.model.decoder_kernels='(5, 5, 4)' \
  --config.model.decoder_paddings='("SAME", "VALID", "SAME")' \
  --config.model.unet_features='(8, 16, 32)' \
  --config.batch_size=16 --config.learning_rate=1e-3 \
  --config.num_train_steps="$steps" --config.log_every_steps=50 \
  --config.eval_every_steps=1000 --config.checkpoint_every_steps=250 \
  --config.eval.batch_size=32 --config.eval.num_batches=8 "$@"
