"""Orbax checkpoints holding the train state and the config it was trained with.

A checkpoint that cannot be written (`CheckpointWriteError`) or restored
(`CheckpointRestoreError`) is said in one line; the "Event loop is closed" errors that
tensorstore's outstanding reads report, each with a traceback, once orbax has given up a restore
are dropped (`_drop_closed_loop_errors`).
"""

import contextlib
import pathlib
import sys
import traceback
from typing import Any

from absl import logging
import ml_collections
import orbax.checkpoint as ocp

from crystal_vae import config_checks
from crystal_vae.configs import default


def checkpoint_manager(workdir: str | pathlib.Path, *, max_to_keep: int = 3,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """A manager for `workdir/checkpoints` with two items: `state` and `config`; a workdir that
  cannot be one is refused first (`config_checks.check_workdir`)."""
  config_checks.check_workdir(workdir, writable=not read_only)
  _drop_closed_loop_errors()
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "config"))


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. a full disk); the complete ones are intact."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint (or not the one asked for) could be restored; said in one line."""


def _is_closed_loop_error(unraisable: Any) -> bool:
  """Whether an unraisable error is asyncio's "Event loop is closed", raised in a callback that
  tensorstore scheduled on the loop of a restore orbax had already given up."""
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return bool(frames) and pathlib.Path(frames[-1].filename).parent.name == "asyncio"


def _drop_closed_loop_errors() -> None:
  """Installs (once) an unraisable-error hook that drops `_is_closed_loop_error` errors and
  passes every other one to the hook it replaces."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_errors", False):
    return

  def hook(unraisable: Any) -> None:
    if not _is_closed_loop_error(unraisable):
      previous(unraisable)

  hook.drops_closed_loop_errors = True
  sys.unraisablehook = hook


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict) -> None:
  """Starts writing checkpoint `step` in the background (an earlier write's failure surfaces
  here or in `wait_until_written` as `CheckpointWriteError`)."""
  with _write_errors(manager.directory, manager):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               config=ocp.args.JsonSave(config.to_dict())))


def wait_until_written(manager: ocp.CheckpointManager) -> None:
  """Waits for the checkpoint being written; raises `CheckpointWriteError` if it failed."""
  with _write_errors(manager.directory, manager):
    manager.wait_until_finished()


@contextlib.contextmanager
def _write_errors(directory: Any, manager: ocp.CheckpointManager | None = None):
  """Any failure inside becomes one `CheckpointWriteError` line; with a manager, naming the
  newest complete checkpoint."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-exception-caught
    message = f"could not write a checkpoint in {directory}: {_first_line(error)}"
    if manager is not None:
      manager.reload()
      message += (f". The newest complete checkpoint ({manager.latest_step()}) is intact: make"
                  " room and run the same command to resume from it")
    raise CheckpointWriteError(message) from error


def save_pytree(tree: Any, directory: str | pathlib.Path) -> None:
  """Writes a pytree of arrays (e.g. a discriminator's parameters) to `directory` with orbax,
  replacing an earlier save, and waits until it is written."""
  _drop_closed_loop_errors()
  checkpointer = ocp.StandardCheckpointer()
  with _write_errors(directory):
    checkpointer.save(pathlib.Path(directory).absolute(), tree, force=True)
    checkpointer.wait_until_finished()


def restore_pytree(directory: str | pathlib.Path, template: Any) -> Any:
  """Reads a pytree written by `save_pytree` into the layout of `template`; one that does not
  restore raises `CheckpointRestoreError`."""
  _drop_closed_loop_errors()
  try:
    return ocp.StandardCheckpointer().restore(pathlib.Path(directory).absolute(), template)
  except Exception as error:  # pylint: disable=broad-exception-caught
    raise CheckpointRestoreError(f"{directory} does not restore: {_error_line(error)}"
                                 ) from error


def restore_config(manager: ocp.CheckpointManager, step: int | None = None
                   ) -> ml_collections.ConfigDict:
  """The config saved with checkpoint `step` (default: the newest that restores). Fields added
  to the project since it was saved take their paper defaults, so older workdirs keep working."""
  restored = _restore(manager, step, ocp.args.Composite(config=ocp.args.JsonRestore()))[1]
  saved = _lists_to_tuples(restored.config)
  return ml_collections.ConfigDict(
      _merged(default.get_config(saved["representation"]).to_dict(), saved))


def _merged(defaults: dict, saved: dict) -> dict:
  """`saved` with the keys only `defaults` has added, recursively."""
  merged = dict(defaults)
  for key, value in saved.items():
    both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
    merged[key] = _merged(defaults[key], value) if both_dicts else value
  return merged


def restore_state(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
                  ) -> tuple[int, Any]:
  """(step, state) of checkpoint `step` (default: the newest that restores) in
  `abstract_state`'s layout."""
  step, restored = _restore(
      manager, step, ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return step, restored.state


def restore_variables(manager: ocp.CheckpointManager, abstract_variables: Any,
                      step: int | None = None) -> tuple[int, Any]:
  """(step, the model's variables alone: `params`, `batch_stats`, in `abstract_variables`'
  layout) from the state of checkpoint `step` (default: the newest that restores), without the
  optimiser."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
  step, restored = _restore(manager, step, ocp.args.Composite(state=ocp.args.PyTreeRestore(
      abstract_variables, restore_args=restore_args, partial_restore=True)))
  return step, restored.state


def set_aside_newer(manager: ocp.CheckpointManager, step: int) -> None:
  """Renames the checkpoints newer than `step` (ones that did not restore) to
  `<step>.unrestorable`, so that the run can save those steps again; their files are kept."""
  for newer in [s for s in manager.all_steps() if s > step]:
    path = pathlib.Path(manager.directory) / str(newer)
    path.rename(path.with_name(f"{newer}.unrestorable"))
    logging.warning("checkpoint %d set aside as %s", newer, path.with_name(f"{newer}.unrestorable"))
  manager.reload()


def _restore(manager: ocp.CheckpointManager, step: int | None, args: Any) -> tuple[int, Any]:
  """Restores `args` from checkpoint `step`; without a step from the newest checkpoint that
  restores, with one warning line for each newer one skipped (e.g. a truncated file)."""
  if step is not None:
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint {step} in {manager.directory}")
    try:
      return step, manager.restore(step, args=args)
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise CheckpointRestoreError(f"checkpoint {step} in {manager.directory} does not restore:"
                                   f" {_error_line(error)}") from error
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  for step in steps:
    try:
      return step, manager.restore(step, args=args)
    except Exception as error:  # pylint: disable=broad-exception-caught
      reason = _error_line(error)
      logging.warning("checkpoint %d in %s does not restore, skipped: %s", step,
                      manager.directory, reason)
  raise CheckpointRestoreError(f"no checkpoint in {manager.directory} restores (tried {steps};"
                               f" the oldest: {reason})")


def _error_line(error: Exception) -> str:
  return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
  """The first line of an orbax / tensorstore error, without its pointer to more details."""
  lines = str(error).strip().splitlines() or [type(error).__name__]
  return lines[0].split(" See full")[0][:300]


def _lists_to_tuples(value: Any) -> Any:
  """JSON turns the config's tuples into lists; ConfigDict fields were tuples."""
  if isinstance(value, dict):
    return {key: _lists_to_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(item) for item in value)
  return value
