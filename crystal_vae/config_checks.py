"""Checks of a config and a workdir, made before anything is written to the workdir.

A value out of range or a workdir that cannot be one raises `ConfigError`, whose message is one
line naming the field (as the `--config.<field>` flag that sets it) or the path, and what it
accepts; the command line prints it as `error: ...` (main.py).
"""

import math
import os
import pathlib
from typing import Any

import jax
import ml_collections

# The coarsest grid (voxels per cube side): in the 10 Å cube a voxel is then 1.25 Å, about the
# shortest bond.
MIN_GRID = 8


class ConfigError(ValueError):
  """A config value out of range, or a workdir that cannot be one (said in one line)."""


def _is_integer(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _require(ok: bool, field: str, value: Any, accepts: str) -> None:
  if not ok:
    raise ConfigError(f"--config.{field}={value!r} is out of range: it must be {accepts}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` for the first training setting out of range."""
  available = jax.device_count()
  several_hosts = jax.process_count() > 1
  _require(config.num_devices == -1 or (not several_hosts and _is_integer(config.num_devices)
                                        and 1 <= config.num_devices <= available),
           "num_devices", config.num_devices,
           "-1 (every device)" + ("" if several_hosts else f" or 1 to {available}, the devices"
                                  " of this machine"))
  devices = available if config.num_devices == -1 else config.num_devices
  for field, value in (("batch_size", config.batch_size),
                       ("eval.batch_size", config.eval.batch_size)):
    _require(_is_integer(value) and value > 0 and value % devices == 0, field, value,
             f"a positive multiple of the {devices} device(s) a batch is split over")
  _require(_is_integer(config.voxel.grid) and config.voxel.grid >= MIN_GRID, "voxel.grid",
           config.voxel.grid, f"an integer of at least {MIN_GRID} (voxels per cube side)")
  for field, value in (("voxel.box", config.voxel.box), ("voxel.sigma", config.voxel.sigma),
                       ("voxel.species_radius", config.voxel.species_radius),
                       ("voxel.cutoff_sigmas", config.voxel.cutoff_sigmas)):
    _require(_is_number(value) and value > 0, field, value, "a number > 0")
  _require(_is_integer(config.model.latent_dim) and config.model.latent_dim >= 1,
           "model.latent_dim", config.model.latent_dim, "an integer of at least 1")
  _require(_is_number(config.learning_rate) and config.learning_rate > 0, "learning_rate",
           config.learning_rate, "a number > 0")
  _require(_is_integer(config.num_train_steps) and config.num_train_steps >= 0,
           "num_train_steps", config.num_train_steps, "an integer of at least 0")
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                "max_checkpoints_to_keep"):
    _require(_is_integer(config[field]) and config[field] >= 1, field, config[field],
             "an integer of at least 1")


def check_workdir(workdir: str | pathlib.Path, *, writable: bool = True) -> pathlib.Path:
  """`workdir` as a path, or `ConfigError` if it cannot be a workdir: a file, a path under a
  file, or (when it is to be `writable`) a directory this process may not write in, or one that
  cannot be made because its nearest existing parent is such a directory. Creates nothing."""
  path = pathlib.Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir={path} is a file, not a directory")
  existing = path
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise ConfigError(f"--workdir={path} lies under {existing}, a file, not a directory")
  if writable and not os.access(existing, os.W_OK | os.X_OK):
    what = "write in it" if existing == path else f"make it in {existing}"
    raise ConfigError(f"--workdir={path}: no permission to {what}")
  return path
