"""Data parallelism for real: two processes on localhost (jax.distributed, gloo collectives on
CPU), two devices each, train through `crystal_vae.main`, are killed mid-run, resume, and end
with the parameters of one process on one device with the same global batch."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from crystal_vae import inference

pytestmark = pytest.mark.slow  # five training processes (minutes)

REPO = pathlib.Path(__file__).parent.parent
TESTS = pathlib.Path(__file__).parent

_STEPS, _LOG_EVERY = 8, 2
# A config file for `--config`: the tests' tiny model, a checkpoint every 2 steps, no evaluation.
_CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config


def get_config():
  config = tiny_config({data!r})
  config.num_train_steps = %d
  config.log_every_steps = config.checkpoint_every_steps = %d
  config.eval.split = "none"  # parameters are compared; evaluation would only add compiling
  # Process 1 finds nothing in JAX's compilation cache (only process 0 writes it, under keys of
  # its own on CPU): XLA's convolutions compile in ~2/3 of the time of the depth sums.
  config.model.conv_impl = "xla"
  return config
""" % (_STEPS, _LOG_EVERY)


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _main(config_file: pathlib.Path, workdir: pathlib.Path, devices: int, *extra: str
          ) -> subprocess.Popen:
  """`crystal_vae.main` on `devices` CPU devices; extra flags after the config's."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
      [sys.executable, "-m", "crystal_vae.main", f"--config={config_file}",
       f"--workdir={workdir}", *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
  output, _ = process.communicate(timeout=400)
  assert process.returncode == 0, output[-3000:]
  return output


def _params(workdir: pathlib.Path) -> dict:
  return jax.device_get(inference.TrainedModel.restore(workdir).variables["params"])


def test_two_processes_killed_and_resumed_train_to_the_parameters_of_one(tfds_dir, tmp_path):
  """Process 1 is killed after checkpoint 4 (process 0 with it: its collectives would wait for
  the dead peer); both restart from the checkpoint and end where one process ends."""
  config_file = tmp_path / "tiny.py"
  config_file.write_text(_CONFIG_FILE.format(tests=str(TESTS), data=tfds_dir))
  # The reference first: gloo gives up when a peer is 30 s late to a collective, so the two
  # processes should not share the cores with a third.
  _finish(_main(config_file, tmp_path / "single", 1))
  workdir = tmp_path / "distributed"

  def start() -> list[subprocess.Popen]:
    # A data dir of their own: process 0 builds the dataset while process 1 waits for it.
    port = _free_port()
    return [_main(config_file, workdir, 2, "--jax_distributed",
                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={index}", f"--config.dataset.data_dir={tmp_path / 'tfds'}")
            for index in range(2)]

  processes = start()
  deadline = time.time() + 400
  while not (workdir / "checkpoints" / "4").is_dir():
    assert time.time() < deadline and processes[1].poll() is None, processes[1].communicate()
    time.sleep(0.05)
  processes[1].kill()
  processes[0].kill()
  for process in processes:
    process.communicate(timeout=60)
  assert not (workdir / "checkpoints" / f"{_STEPS}").exists()  # killed mid-run
  outputs = [_finish(process) for process in start()]
  for index, output in enumerate(outputs):
    assert f"JAX process {index}/2" in output and "Resumed from step" in output
  # One writer: process 0 logs each step's metrics once.
  steps = [json.loads(line)["step"]
           for line in (workdir / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "train"]
  assert steps == list(range(_LOG_EVERY, _STEPS + 1, _LOG_EVERY))
  one, two = _params(tmp_path / "single"), _params(workdir)
  # Float sums in another order: Adam turns a few near-zero gradients into steps of the other
  # sign. Measured: mean difference 1.3e-6 (max 1e-4; 1.0e-6 and 5.0e-4 since the bias
  # gradients and the class maximum are native sums too), while one step moves a weight by 5e-5
  # on average, so another batch, key or resume point would be caught.
  differences = np.concatenate([np.abs(a - b).ravel()
                                for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two))])
  assert differences.max() < 1e-3 and differences.mean() < 1e-5, (differences.max(),
                                                                   differences.mean())
