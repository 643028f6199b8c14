"""Command line: `python -m crystal_vae.main --config=configs/repeat.py --workdir=DIR [--mode=...]`.

Modes (modes.py): `train` (resumes from DIR's latest checkpoint), `evaluate` (reconstruct a
split and measure it), `sample`, `interpolate`, `traverse`, `conditional`, `discriminator` and
`optimize`; each writes under DIR/<mode>/.
"""

import ast
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from crystal_vae import checkpoints
from crystal_vae import config_checks
from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae import inference
from crystal_vae import models
from crystal_vae import modes
from crystal_vae import process_settings
from crystal_vae import quiet_logging
from crystal_vae import saved_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, e.g. configs/repeat.py:quick. Without it, the config"
    " saved with the workdir's latest checkpoint is used (e.g. to sample from pretrained/*).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.DEFINE_enum("mode", "train", modes.NAMES, "What to do with the config and workdir.")
flags.DEFINE_bool("jax_distributed", False,
                  "Call jax.distributed.initialize() first: one process per host (or per GPU).")
flags.DEFINE_string("coordinator_address", None,
                    "With --jax_distributed: host:port of process 0; unset = from the cluster "
                    "(SLURM, Open MPI, ...) or JAX_COORDINATOR_ADDRESS.")
flags.DEFINE_integer("num_processes", None, "With --jax_distributed; unset = from the cluster.")
flags.DEFINE_integer("process_id", None, "With --jax_distributed; unset = from the cluster.")
flags.mark_flags_as_required(["workdir"])


# Errors in what the user gave (a setting out of range; a workdir that cannot be one; a crystal
# that cannot be voxelised; data with nothing usable left; a checkpoint that does not restore)
# and of the file system (OSError: a missing file, folder or checkpoint, no permission, a full
# disk while writing a checkpoint (`checkpoints.CheckpointWriteError`) or metrics, a failed
# download) end the run with one line, not a traceback.
_ONE_LINE_ERRORS = (OSError, crystals.RejectedCrystal, datasets.DatasetError,
                    config_checks.ConfigError, checkpoints.CheckpointRestoreError,
                    inference.ConfigMismatch, inference.SettingsError, models.ModelConfigError)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a misspelled `--config.*` override gives one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:  # ml_collections: no such config field
    text = str(error)
    try:
      text = ast.literal_eval(text)  # a KeyError's message arrives quoted
    except (ValueError, SyntaxError):
      pass
    lines = [line.strip(" '\"") for line in str(text).splitlines() if line.strip()]
    hint = f". {lines[-1]}" if len(lines) > 1 else ""
    raise SystemExit(f"error: the config has no field {lines[0]!r}{hint}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.jax_distributed:
    # CPU processes exchange gradients through gloo; GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    modes.run(FLAGS.mode, FLAGS.config or saved_config.get_config(FLAGS.workdir), FLAGS.workdir,
              dataset_given=any(arg.startswith("--config.dataset.") for arg in sys.argv))
  except _ONE_LINE_ERRORS as error:
    raise SystemExit(f"error: {error}") from None


def with_saved_config(argv: list[str]) -> list[str]:
  """Without `--config`, `--config.*` overrides apply to the config saved in `--workdir=DIR`."""
  if any(arg == "--config" or arg.startswith("--config=") for arg in argv):
    return argv
  if not any(arg.startswith("--config.") for arg in argv):
    return argv
  workdirs = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--workdir=")]
  if not workdirs:
    return argv
  # Before the overrides: absl parses flags in order.
  return argv[:1] + [f"--config={pathlib.Path(saved_config.__file__)}:{workdirs[-1]}"] + argv[1:]


if __name__ == "__main__":
  process_settings.apply()  # before JAX's first computation
  # Before the flags are parsed: a saved config is restored while parsing `--config.*` flags.
  quiet_logging.install()
  app.run(main, argv=with_saved_config(sys.argv), flags_parser=parse_flags)
