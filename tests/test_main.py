"""The command line: mistakes in what the user gives end with one line, not a traceback."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("arguments, message", [
    (["--config.num_train_step=10"],
     "error: the config has no field 'num_train_step'. Did you mean \"num_train_steps\""),
    (["--mode=sample"], "error: no checkpoint in "),
    (["--config.dataset.name=cif_dir", "--config.dataset.path={tmp}/no_such_folder"],
     "error: no such directory: "),
    (["--config.model.conv_impl=fftx"], "error: model.conv_impl 'fftx' not in ('auto', 'xla', "),
    (["--config.model.conv_impl=fft"],
     "error: model.conv_impl 'fft' has stride 1 only and the encoder's strides are (2, 1, 2, 2)"),
])
def test_mistakes_end_in_one_line(arguments, message, tmp_path):
  arguments = [argument.format(tmp=tmp_path) for argument in arguments]
  result = subprocess.run(
      [sys.executable, "-m", "crystal_vae.main", f"--config={REPO}/configs/repeat.py:quick",
       f"--workdir={tmp_path / 'run'}", *arguments],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]


def test_a_config_of_another_model_is_one_of_the_one_line_errors():
  # Raised by TrainedModel.for_mode (test_generation.py); main turns these into `error: ...`.
  from crystal_vae import inference, main  # pylint: disable=import-outside-toplevel
  one_line_errors = main._ONE_LINE_ERRORS  # pylint: disable=protected-access
  assert issubclass(inference.ConfigMismatch, one_line_errors)


def test_a_mode_setting_the_model_cannot_run_is_one_line():
  """`inference.SettingsError` (a mode's settings that cannot run) ends in one line too; here an
  unknown `sample.prior` on the shipped model, refused before anything is written."""
  result = subprocess.run(
      [sys.executable, "-m", "crystal_vae.main",
       f"--workdir={REPO / 'pretrained' / 'perov5_repeat'}", "--mode=sample",
       "--config.sample.prior=uniform"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "error: sample.prior must be one of ('standard', 'fitted'), got 'uniform'")
