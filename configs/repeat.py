"""The repeat representation: `--config=configs/repeat.py` (the paper's settings) or a recipe:
`:quick` (the embedded perov_5 in minutes, then held-out crystals rebuilt), `:cpu` / `:gpu`
(perov_5 on a 2-core CPU / one GPU), `:mp_cpu` / `:mp_gpu` (the Materials Project; give its
directory with `--config.dataset.path=DIR`)."""

from crystal_vae import default_config


def get_config(arg=None):
  return default_config.get_config("repeat", arg)
