"""Configs: every default in `default.py`, the recipes in `recipes.py`, and one file per
representation for `--config=configs/<representation>.py[:recipe]`. Installed with the package
as `crystal_vae.configs`."""
