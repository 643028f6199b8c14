"""Every mode runs on a copy of every shipped workdir as a new user runs it: no `../shared`, no
network, no `--config.dataset.*` flag (the saved dataset, or the embedded perov_5 where the saved
one is not on this machine)."""

import json
import pathlib
import shutil
import socket
import time

import ml_collections
import pytest

from crystal_vae import inference
from crystal_vae import modes
from crystal_vae import saved_config

PRETRAINED = pathlib.Path(__file__).resolve().parents[1] / "pretrained"
SHIPPED = sorted(path for path in PRETRAINED.iterdir() if (path / "checkpoints").is_dir())

# Small settings of each mode (what `--config.<mode>.*` flags would give).
SMALL = {
    "eval": {"num_batches": 1, "batch_size": 4},
    "sample": {"num": 4, "batch_size": 4, "num_reference": 8, "num_train_structures": 8,
               "gallery": 4},
    "interpolate": {"steps": 3},
    "traverse": {"steps": 3},
    "conditional": {"num_targets": 2, "num_samples": 2, "batch_size": 2},
    "discriminator": {"num_train_steps": 4, "num_real": 8, "num_eval": 4, "batch_size": 4,
                      "log_every_steps": 2},
    "optimize": {"num": 2, "screen_draws": 16, "screen_rebuilt": 4, "steps": 3, "num_saved": 2,
                 "batch_size": 2},
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise OSError("network is off in this test")
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket.socket, "connect", refuse)


def copy_of(shipped: pathlib.Path, directory: pathlib.Path, tfds_dir: str) -> pathlib.Path:
  """A copy of `shipped` whose saved config builds its datasets under `tfds_dir` (only where
  TFDS keeps built data; the dataset itself is the saved one)."""
  workdir = directory / shipped.name
  shutil.copytree(shipped, workdir)
  for metadata in workdir.glob("checkpoints/*/config/metadata"):
    config = json.loads(metadata.read_text())
    config["dataset"]["data_dir"] = tfds_dir
    metadata.write_text(json.dumps(config))
  return workdir


def test_no_shipped_config_holds_a_path_of_this_workspace():
  for metadata in PRETRAINED.glob("*/checkpoints/*/config/metadata"):
    config = json.loads(metadata.read_text())
    assert config["dataset"]["path"] == "", metadata
    assert "shared" not in metadata.read_text(), metadata


@pytest.mark.slow
@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda path: path.name)
def test_every_mode_runs_on_a_shipped_workdir_offline(shipped, tmp_path, tfds_dir, monkeypatch,
                                                      capsys):
  monkeypatch.chdir(tmp_path)  # no ../shared beside it
  workdir = copy_of(shipped, tmp_path, tfds_dir)
  config = saved_config.get_config(str(workdir))
  for section, values in SMALL.items():
    config[section].update(values)
  # One restored model for every mode, as the command line restores it for each.
  model = inference.TrainedModel.for_mode(config, workdir, dataset_given=False)
  for mode, (run_mode, section, folder) in modes.MODES.items():
    out_dir = workdir / folder
    if mode == "conditional" and not config.model.conditional:
      with pytest.raises(inference.SettingsError, match="not conditional"):
        run_mode(model, config[section], out_dir)
      continue
    if mode == "optimize" and not config.model.properties:
      with pytest.raises(inference.SettingsError, match="no property head"):
        run_mode(model, config[section], out_dir)
      continue
    if mode == "optimize":  # judged by another shipped model with the same property head
      judges = [path for path in SHIPPED if path != shipped
                and saved_config.get_config(str(path)).model.properties == config.model.properties]
      config.optimize.judge = str(copy_of(judges[0], tmp_path / "judge", tfds_dir))
    summary = run_mode(model, config[section], out_dir)
    assert summary, mode
    written = [path for path in out_dir.rglob("*") if path.is_file()]
    assert written, f"{mode} wrote nothing under {out_dir}"
  assert "Traceback" not in capsys.readouterr().out


def test_a_saved_dataset_not_on_this_machine_falls_back_to_the_embedded_one(tmp_path, tfds_dir,
                                                                            capsys):
  workdir = copy_of(PRETRAINED / "perov5_unit_cell", tmp_path, tfds_dir)
  for metadata in workdir.glob("checkpoints/*/config/metadata"):
    config = json.loads(metadata.read_text())
    config["dataset"].update(name="csv", path=str(tmp_path / "not_here"))
    metadata.write_text(json.dumps(config))
  config = saved_config.get_config(str(workdir))
  model = inference.TrainedModel.for_mode(config, workdir, dataset_given=False)
  assert (model.config.dataset.name, model.config.dataset.path) == ("perov_5", "")
  note = capsys.readouterr().out.strip().splitlines()
  assert note == [f"note: the dataset this model was trained on (csv, {tmp_path / 'not_here'})"
                  " is not on this machine: using the embedded perov_5 crystals (give yours with"
                  " --config.dataset.path=DIR)"]


def test_a_download_without_network_fails_at_once_in_one_line(tmp_path):
  from crystal_vae import datasets  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"name": "carbon_24", "path": "",
                                      "data_dir": str(tmp_path)})
  start = time.monotonic()
  with pytest.raises(datasets.DownloadError, match="cannot download the carbon_24 CSVs") as error:
    datasets.load_data_sources(config)
  assert time.monotonic() - start < 10
  assert "\n" not in str(error.value)
