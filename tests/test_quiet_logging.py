"""The chatter of orbax, TFDS and JAX's backend note is kept out of the terminal; errors stay."""

import logging

from absl import logging as absl_logging

from crystal_vae import quiet_logging


def _record(pathname: str, level: int, message: str) -> logging.LogRecord:
  return logging.LogRecord("absl", level, pathname, 1, message, None, None)


def test_the_filter_drops_library_chatter_and_keeps_errors_and_everything_else():
  quiet = quiet_logging.QuietLibraries()
  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not quiet.filter(_record(orbax, logging.WARNING, "Given directory is read only"))
  assert not quiet.filter(_record("/site-packages/tensorflow_datasets/core/a.py", logging.INFO,
                                  "custom data configuration"))
  assert not quiet.filter(_record("/site-packages/jax/_src/xla_bridge.py", logging.INFO,
                                  "Unable to initialize backend 'tpu'"))
  assert quiet.filter(_record(orbax, logging.ERROR, "could not save"))
  assert quiet.filter(_record("/x/crystal_vae/train.py", logging.WARNING, "a user's warning"))


def test_install_quiets_the_absl_logger_whatever_handler_shows_it(caplog):
  quiet_logging.install()
  with caplog.at_level(logging.INFO, logger="absl"):
    absl_logging.get_absl_logger().findCaller = lambda *args, **kwargs: (
        "/site-packages/orbax/checkpoint/x.py", 1, "f", None)
    try:
      absl_logging.warning("Given directory is read only")
    finally:
      del absl_logging.get_absl_logger().findCaller
    absl_logging.warning("kept")
  assert [record.getMessage() for record in caplog.records] == ["kept"]
