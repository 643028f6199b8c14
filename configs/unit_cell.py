"""The unit_cell representation: `--config=configs/unit_cell.py` (paper) or `configs/unit_cell.py:quick` (CPU)."""

from crystal_vae import default_config


def get_config(arg=None):
  return default_config.get_config("unit_cell", arg)
