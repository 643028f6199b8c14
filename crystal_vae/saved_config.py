"""The config saved with a workdir's latest checkpoint, as a config file:
`--config=crystal_vae/saved_config.py:WORKDIR` (what `main` uses when only `--config.*`
overrides are given)."""

import ml_collections

from crystal_vae import checkpoints


def get_config(workdir: str) -> ml_collections.ConfigDict:
  manager = checkpoints.checkpoint_manager(workdir, read_only=True)
  if manager.latest_step() is None:
    raise SystemExit(f"error: --config is needed: {workdir} holds no checkpoint to take it from")
  return checkpoints.restore_config(manager)
