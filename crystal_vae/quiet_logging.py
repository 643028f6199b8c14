"""Keeps the terminal and the notebooks to what a user reads.

`install()` (called by the command line and the notebooks) drops the INFO and WARNING chatter of
orbax and TFDS (read-only directories, custom data configurations, missing dataset_info.json) and
JAX's note that no TPU is present, and the tracebacks of orbax's background threads (a failed
save ends in `CheckpointWriteError`, one line). Their errors stay.
"""

import logging

from absl import logging as absl_logging

# Where the chatter is logged from: orbax and TFDS through absl's logger, JAX's backend note.
_LOGGERS = ("absl", "jax._src.xla_bridge")


class QuietLibraries(logging.Filter):
  """Passes a record unless it is the chatter of the module docstring."""

  _NOISY = ("orbax", "tensorflow_datasets")

  def filter(self, record: logging.LogRecord) -> bool:
    if "xla_bridge" in record.pathname and "Unable to initialize backend" in record.getMessage():
      return False
    if not any(name in record.pathname for name in self._NOISY):
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.ERROR


def install() -> None:
  """Filters absl's handler (the command line's output) and the loggers the chatter comes from
  (whatever handler shows them, as in a notebook)."""
  quiet = QuietLibraries()
  absl_logging.get_absl_handler().addFilter(quiet)
  for name in _LOGGERS:
    logging.getLogger(name).addFilter(quiet)
