"""The repeat representation: `--config=configs/repeat.py` (paper), `:cpu` (perov_5 on a CPU), `:gpu` (perov_5 on one GPU) or `:quick` (prototypes, minutes)."""

from crystal_vae import default_config


def get_config(arg=None):
  return default_config.get_config("repeat", arg)
