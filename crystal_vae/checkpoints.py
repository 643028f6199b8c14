"""Orbax checkpoints holding the train state and the config it was trained with."""

import pathlib
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from crystal_vae import default_config


def checkpoint_manager(workdir: str | pathlib.Path, *, max_to_keep: int = 3,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """A manager for `workdir/checkpoints` with two items: `state` and `config`."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             config=ocp.args.JsonSave(config.to_dict())))


def restore_config(manager: ocp.CheckpointManager, step: int | None = None
                   ) -> ml_collections.ConfigDict:
  """The config saved with checkpoint `step` (default: the latest). Fields added to the project
  since it was saved take their paper defaults, so older workdirs keep working."""
  step = _existing_step(manager, step)
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  saved = _lists_to_tuples(restored.config)
  return ml_collections.ConfigDict(
      _merged(default_config.get_config(saved["representation"]).to_dict(), saved))


def _merged(defaults: dict, saved: dict) -> dict:
  """`saved` with the keys only `defaults` has added, recursively."""
  merged = dict(defaults)
  for key, value in saved.items():
    both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
    merged[key] = _merged(defaults[key], value) if both_dicts else value
  return merged


def restore_state(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
                  ) -> Any:
  """Restores the state of checkpoint `step` (default: latest) into `abstract_state`'s layout."""
  step = _existing_step(manager, step)
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored.state


def _existing_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {manager.directory}")
  return step


def _lists_to_tuples(value: Any) -> Any:
  """JSON turns the config's tuples into lists; ConfigDict fields were tuples."""
  if isinstance(value, dict):
    return {key: _lists_to_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(item) for item in value)
  return value
