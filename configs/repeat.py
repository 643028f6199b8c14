"""The repeat representation: `--config=configs/repeat.py` (the paper's settings) or a recipe
of `configs/recipes.py`, e.g. `configs/repeat.py:quick` (the embedded perov_5 in minutes, then
held-out crystals rebuilt) or `:mp_cpu` (the Materials Project; `--config.dataset.path=DIR`)."""

import ml_collections

from crystal_vae.configs import recipes


def get_config(recipe: str | None = None) -> ml_collections.ConfigDict:
  return recipes.for_command_line("repeat", recipe)
