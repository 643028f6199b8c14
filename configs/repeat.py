"""The repeat representation: `--config=configs/repeat.py` (paper) or `configs/repeat.py:quick` (CPU)."""

from crystal_vae import default_config


def get_config(arg=None):
  return default_config.get_config("repeat", arg)
