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
@pytest.mark.slow
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


SHIPPED = REPO / "pretrained" / "perov5_repeat"


@pytest.mark.parametrize("arguments, message", [
    # inference.SettingsError: a mode's setting that cannot run on the model
    (["--config.sample.prior=uniform"],
     "error: sample.prior must be one of ('learned', 'mixture', 'fitted', 'standard'), got 'uniform'"),
    # inference.ConfigMismatch: a --config of another model than the checkpoint's
    ([f"--config={REPO}/configs/unit_cell.py:quick"],
     f"error: --config describes another model than the checkpoint in {SHIPPED} (different "
     "representation; it holds a repeat model)"),
])
@pytest.mark.slow
def test_a_mode_the_shipped_model_cannot_run_is_one_line(arguments, message):
  """Settings the shipped model cannot run end in one line, refused before anything is written
  to its workdir."""
  files = sorted(SHIPPED.rglob("*"))
  result = subprocess.run(
      [sys.executable, "-m", "crystal_vae.main", f"--workdir={SHIPPED}", "--mode=sample",
       *arguments],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
  assert sorted(SHIPPED.rglob("*")) == files
