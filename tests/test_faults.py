"""Faults end in one line: checkpoints that do not restore, a full disk, a save killed
half way, settings out of range, workdirs that cannot be one, data files with bad rows."""

import asyncio
import csv
import errno
import gc
import gzip
import io
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from conftest import small_config, tiny_config, trained_checkpoint
from crystal_vae import checkpoints
from crystal_vae import config_checks
from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae import inference
from crystal_vae import main
from crystal_vae import modes
from crystal_vae import train

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir) -> pathlib.Path:
  return trained_checkpoint(tmp_path_factory, tfds_dir)


def _params(workdir: pathlib.Path, step: int | None = None):
  return jax.device_get(inference.TrainedModel.restore(workdir, step).variables["params"])


def _assert_same(a, b) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _truncate(step_dir: pathlib.Path) -> None:
  """Cuts every array file of a checkpoint's state in half, as a full disk or a crash would."""
  for data in (step_dir / "state").rglob("d/*"):
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _with_broken_newer_step(trained: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
  """A copy of the trained workdir (checkpoint 2) with a checkpoint 4 whose arrays are cut."""
  shutil.copytree(trained, workdir)
  shutil.copytree(workdir / "checkpoints" / "2", workdir / "checkpoints" / "4")
  _truncate(workdir / "checkpoints" / "4")
  return workdir


class _Unraisable:
  """Records the errors Python reports as unraisable (tensorstore's callbacks on a closed loop
  among them), in place of printing their tracebacks."""

  def __init__(self):
    self.errors = []

  def __call__(self, unraisable):
    self.errors.append(f"{type(unraisable.exc_value).__name__}: {unraisable.exc_value}")


def _one_line(error: BaseException) -> str:
  """The error as the command line prints it, checked to be one of its one-line errors."""
  assert isinstance(error, main._ONE_LINE_ERRORS)  # pylint: disable=protected-access
  text = f"error: {error}"
  assert "\n" not in text, text
  return text


# Checkpoints.


def test_a_truncated_newest_checkpoint_is_skipped_with_one_warning_and_no_traceback(
    trained, tmp_path, caplog, monkeypatch):
  """Before, each of tensorstore's reads still running when orbax gave up checkpoint 4 printed an
  asyncio "Event loop is closed" traceback (hundreds in a training run) around the warning."""
  workdir = _with_broken_newer_step(trained, tmp_path / "run")
  unraisable = _Unraisable()
  monkeypatch.setattr(sys, "unraisablehook", unraisable)
  with caplog.at_level(logging.WARNING):
    params = _params(workdir)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and "crystal_vae" in r.pathname]
  directory = workdir.absolute() / "checkpoints"
  assert len(warnings) == 1 and warnings[0].startswith(
      f"checkpoint 4 in {directory} does not restore, skipped: ValueError:")
  assert "\n" not in warnings[0]
  _assert_same(params, _params(trained))
  for _ in range(3):  # how many reads are left running, and so report errors, depends on timing
    _params(workdir)
  gc.collect()
  assert unraisable.errors == []


def test_only_asyncio_closed_loop_errors_are_dropped(monkeypatch):
  """A callback scheduled on a closed loop (as tensorstore's are) is dropped; the same message
  raised elsewhere, and any other error, still reaches the hook that was there before."""
  unraisable = _Unraisable()
  monkeypatch.setattr(sys, "unraisablehook", unraisable)
  checkpoints._drop_closed_loop_errors()  # pylint: disable=protected-access
  checkpoints._drop_closed_loop_errors()  # pylint: disable=protected-access (installed once)
  loop = asyncio.new_event_loop()
  loop.close()

  class Late:
    def __del__(self):
      loop.call_soon_threadsafe(print)

  class Broken:
    def __init__(self, message):
      self.message = message

    def __del__(self):
      raise RuntimeError(self.message)

  Late()
  Broken("Event loop is closed")
  Broken("something else")
  assert unraisable.errors == ["RuntimeError: Event loop is closed",
                               "RuntimeError: something else"]


def test_no_checkpoint_that_restores_is_one_line(trained, tmp_path):
  workdir = _with_broken_newer_step(trained, tmp_path / "run")
  _truncate(workdir / "checkpoints" / "2")
  directory = workdir.absolute() / "checkpoints"
  with pytest.raises(checkpoints.CheckpointRestoreError) as raised:
    inference.TrainedModel.restore(workdir)
  assert _one_line(raised.value).startswith(
      f"error: no checkpoint in {directory} restores (tried [4, 2]; the oldest: ValueError:")
  with pytest.raises(checkpoints.CheckpointRestoreError) as raised:
    inference.TrainedModel.restore(workdir, step=2)
  assert _one_line(raised.value).startswith(
      f"error: checkpoint 2 in {directory} does not restore: ValueError:")


def test_a_full_disk_while_a_checkpoint_is_written_is_one_line(trained, tfds_dir, tmp_path,
                                                               monkeypatch):
  """The write fails in orbax's background thread (mocked: the save starts nothing, the wait
  reports ENOSPC): one line naming the disk error and the checkpoint that is intact."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)

  def full_disk(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", lambda self, *a, **k: True)
  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "wait_until_finished", full_disk)
  config = small_config(tfds_dir)
  config.eval.split = "none"
  config.num_train_steps = 4
  with pytest.raises(checkpoints.CheckpointWriteError) as raised:
    train.train_and_evaluate(config, str(workdir))
  assert _one_line(raised.value) == (
      f"error: could not write a checkpoint in {workdir.absolute() / 'checkpoints'}: [Errno 28]"
      " No space left on device. The newest complete checkpoint (2) is intact: make room and run"
      " the same command to resume from it")
  monkeypatch.undo()
  assert checkpoints.checkpoint_manager(workdir, read_only=True).all_steps() == [2]


_KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import small_config
from crystal_vae import checkpoints, train

real_save = checkpoints.save

def save_and_die(manager, step, state, config):  # killed while orbax writes checkpoint 4
  real_save(manager, step, state, config)
  if step == 4:
    os.kill(os.getpid(), signal.SIGKILL)

checkpoints.save = save_and_die
config = small_config({tfds_dir!r})
config.eval.split = "none"
config.num_train_steps = 4
train.train_and_evaluate(config, {workdir!r})
"""


@pytest.mark.slow
def test_a_process_killed_while_saving_resumes_from_the_last_complete_checkpoint(
    trained, tfds_dir, tmp_path, caplog, monkeypatch):
  """SIGKILL right after checkpoint 4's write started: the run resumes from checkpoint 2 (what
  the kill left of 4 is ignored), with no warning and no unraisable error, and saves 4."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  script = _KILLED_SAVE.format(tests=str(REPO / "tests"), tfds_dir=tfds_dir, workdir=str(workdir))
  killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert checkpoints.checkpoint_manager(workdir, read_only=True).all_steps() == [2]
  unraisable = _Unraisable()
  monkeypatch.setattr(sys, "unraisablehook", unraisable)
  config = small_config(tfds_dir)
  config.eval.split = "none"
  config.num_train_steps = 4
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(workdir))
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
          and "crystal_vae" in r.pathname] == []
  assert unraisable.errors == []
  assert checkpoints.checkpoint_manager(workdir, read_only=True).all_steps() == [2, 4]


# Settings and workdirs.


@pytest.mark.parametrize("field, value, accepts", [
    ("batch_size", 0, "a positive multiple of the 1 device(s) a batch is split over"),
    ("eval.batch_size", -8, "a positive multiple of the 1 device(s) a batch is split over"),
    ("voxel.grid", 7, "an integer of at least 8 (voxels per cube side)"),
    ("voxel.sigma", 0.0, "a number > 0"),
    ("voxel.sigma", -1.0, "a number > 0"),
    ("voxel.box", float("nan"), "a number > 0"),
    ("model.latent_dim", 0, "an integer of at least 1"),
    ("learning_rate", -1e-3, "a number > 0"),
    ("log_every_steps", 0, "an integer of at least 1"),
    ("num_devices", 2, "-1 (every device) or 1 to 1, the devices of this machine"),
])
def test_a_setting_out_of_range_is_one_line_before_anything_is_written(field, value, accepts,
                                                                       tfds_dir, tmp_path):
  config = tiny_config(tfds_dir)
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  workdir = tmp_path / "run"
  with pytest.raises(config_checks.ConfigError) as raised:
    train.train_and_evaluate(config, str(workdir))
  assert _one_line(raised.value) == (
      f"error: --config.{field}={value!r} is out of range: it must be {accepts}")
  assert not workdir.exists()


def test_settings_at_their_bounds_are_accepted(tfds_dir):
  config = tiny_config(tfds_dir)
  config.voxel.grid, config.model.latent_dim, config.batch_size = 8, 1, 1
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
  config.num_devices = 1
  config_checks.check_config(config)


@pytest.mark.slow
def test_a_batch_the_devices_cannot_share_is_one_line_on_the_command_line(tmp_path):
  """The command line with two (virtual) devices and a batch of 3: one line, exit 1, no
  traceback and no workdir."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "crystal_vae.main", f"--config={REPO}/configs/repeat.py:quick",
       f"--workdir={workdir}", "--config.batch_size=3"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu",
                         XLA_FLAGS="--xla_force_host_platform_device_count=2"),
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --config.batch_size=3 is out of range: it must be a positive multiple of the 2"
      " device(s) a batch is split over")
  assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_one_line_in_training_and_in_the_modes(tfds_dir, tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("not a workdir")
  with pytest.raises(config_checks.ConfigError) as raised:
    train.train_and_evaluate(tiny_config(tfds_dir), str(path))
  assert _one_line(raised.value) == f"error: --workdir={path} is a file, not a directory"
  with pytest.raises(config_checks.ConfigError) as raised:
    train.train_and_evaluate(tiny_config(tfds_dir), str(path / "run"))
  assert _one_line(raised.value) == (
      f"error: --workdir={path / 'run'} lies under {path}, a file, not a directory")
  with pytest.raises(config_checks.ConfigError) as raised:
    modes.run("sample", small_config(tfds_dir), str(path))
  assert _one_line(raised.value) == f"error: --workdir={path} is a file, not a directory"
  assert path.read_text() == "not a workdir"


def test_a_workdir_without_write_permission_is_one_line(tfds_dir, tmp_path, monkeypatch):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  if os.geteuid() == 0:  # root writes anywhere: what `os.access` tells any other user here
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: (
        not mode & os.W_OK if pathlib.Path(path) == locked else access(path, mode)))
  try:
    with pytest.raises(config_checks.ConfigError) as raised:
      train.train_and_evaluate(tiny_config(tfds_dir), str(locked))
    assert _one_line(raised.value) == f"error: --workdir={locked}: no permission to write in it"
    with pytest.raises(config_checks.ConfigError) as raised:
      train.train_and_evaluate(tiny_config(tfds_dir), str(locked / "run"))
    assert _one_line(raised.value) == (
        f"error: --workdir={locked / 'run'}: no permission to make it in {locked}")
  finally:
    locked.chmod(0o700)
  assert list(locked.iterdir()) == []


# Data files.


def _cif(structure: Structure) -> str:
  return str(CifWriter(structure))


NACL = _cif(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                      [[0, 0, 0], [0.5, 0.5, 0.5]]))
CSCL = _cif(Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
CU = _cif(Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.61), ["Cu"], [[0, 0, 0]]))
BINARY = "data_x\x00\x01" + b"\xff\xfe\x89PNG".decode("latin-1")  # written as bytes below


def _write_csv(path: pathlib.Path, header: list[str], rows: list[list[str]]) -> None:
  """A CSV whose cells are written as given; `BINARY` cells as the raw bytes 00 01 ff fe 89."""
  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(header)
  writer.writerows(rows)
  data = text.getvalue().encode("latin-1" if any(BINARY in row for row in rows) else "utf-8")
  if path.name.endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)


def _dataset(source: pathlib.Path, data_dir: pathlib.Path, name: str = "csv"
             ) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"name": name, "path": str(source), "data_dir": str(data_dir)})


def _rejected(config) -> dict[str, tuple[str, str, str]]:
  with open(datasets.rejected_path(datasets.make_builder(config)), newline="") as handle:
    return {row["source"]: (row["id"], row["reason"], row["detail"])
            for row in csv.DictReader(handle)}


def test_bad_rows_are_counted_by_reason_and_the_good_ones_built(tmp_path, capsys):
  """A row whose CIF is binary, a row cut short before its cif field, an id twice in train and
  once more in validation: each skipped with its reason (the first of an id is kept)."""
  source = tmp_path / "source"
  source.mkdir()
  header = ["material_id", "cif", "energy"]
  _write_csv(source / "train.csv", header, [
      ["nacl", NACL, "-1"], ["blob", BINARY, "-2"], ["short"], ["nacl", CSCL, "-3"],
      ["cscl", CSCL, "-4"]])
  _write_csv(source / "val.csv", header, [["cscl", CU, "-5"], ["cu", CU, "-6"]])
  config = _dataset(source, tmp_path / "tfds")
  sources = datasets.load_data_sources(config)
  train_ids = [datasets.record_to_crystal(r).id for r in sources["train"]]
  assert train_ids == ["nacl", "cscl"]
  kept_nacl = datasets.record_to_crystal(sources["train"][0])
  assert kept_nacl.num_atoms == 8 and kept_nacl.properties == {"energy": -1.0}
  assert [datasets.record_to_crystal(r).id for r in sources["validation"]] == ["cu"]
  rows = _rejected(config)
  train_csv, val_csv = source / "train.csv", source / "val.csv"
  assert {where: (name, reason) for where, (name, reason, _) in rows.items()} == {
      f"{train_csv}:row 2": ("blob", crystals.UNPARSABLE),
      f"{train_csv}:row 3": ("short", crystals.UNPARSABLE),
      f"{train_csv}:row 4": ("nacl", datasets.DUPLICATE_ID),
      f"{val_csv}:row 1": ("cscl", datasets.DUPLICATE_ID)}
  assert rows[f"{train_csv}:row 2"][2] == (
      "the row's cif field is binary, not CIF text (byte 0x00 at character 6)")
  assert rows[f"{train_csv}:row 3"][2] == "the row's cif field is missing"
  assert rows[f"{train_csv}:row 4"][2] == f"the id of {train_csv}:row 1, kept"
  assert rows[f"{val_csv}:row 1"][2] == f"the id of {train_csv}:row 5, kept"
  printed = capsys.readouterr().out
  assert "train: kept 2, skipped 3 (unparsable_cif=2, duplicate_id=1)" in printed
  assert "validation: kept 1, skipped 1 (duplicate_id=1)" in printed


def test_a_binary_cif_file_is_skipped_with_its_reason(tmp_path):
  source = tmp_path / "cifs"
  source.mkdir()
  (source / "nacl.cif").write_text(NACL)
  (source / "picture.cif").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
  config = _dataset(source, tmp_path / "tfds", "cif_dir")
  config.split_fractions = (1.0, 0.0, 0.0)
  sources = datasets.load_data_sources(config)
  assert [datasets.record_to_crystal(r).id for r in sources["train"]] == ["nacl"]
  assert _rejected(config) == {str(source / "picture.cif"): (
      "picture", crystals.UNPARSABLE,
      "the file is binary, not CIF text (byte 0x89 at character 0)")}


def test_a_csv_without_a_cif_column_is_one_line(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  _write_csv(source / "train.csv", ["material_id", "structure"], [["nacl", NACL]])
  with pytest.raises(datasets.DatasetError) as raised:
    datasets.load_data_sources(_dataset(source, tmp_path / "tfds"))
  assert _one_line(raised.value) == (
      f"error: {source / 'train.csv'} has no 'cif' column (its columns: ['material_id',"
      " 'structure']); a CDVAE-style CSV has material_id, cif and property columns")


def test_a_file_that_is_not_gzip_is_one_line(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  (source / "train.csv.gz").write_bytes(b"material_id,cif\nnacl,not gzipped\n")
  with pytest.raises(datasets.DatasetError) as raised:
    datasets.load_data_sources(_dataset(source, tmp_path / "tfds"))
  assert _one_line(raised.value).startswith(
      f"error: {source / 'train.csv.gz'} cannot be read as a CSV (gzip): BadGzipFile:")


def test_an_empty_split_is_one_line_when_it_is_needed(tfds_dir, tmp_path):
  """val.csv holds only its header, test.csv only rows that fail: the build keeps train; asking
  for either of the others says why there is none, and training with one stops before writing."""
  source = tmp_path / "source"
  source.mkdir()
  header = ["material_id", "cif"]
  _write_csv(source / "train.csv", header, [["nacl", NACL], ["cscl", CSCL]])
  _write_csv(source / "val.csv", header, [])
  _write_csv(source / "test.csv", header, [["blob", BINARY], ["garbage", "not a CIF"]])
  config = _dataset(source, tmp_path / "tfds")
  assert set(datasets.load_data_sources(config)) == {"train"}
  with pytest.raises(datasets.DatasetError) as raised:
    datasets.split_source(config, "validation")
  assert _one_line(raised.value) == (
      "error: dataset 'csv' has no 'validation' crystal (its splits: train)")
  with pytest.raises(datasets.DatasetError) as raised:
    datasets.split_source(config, "test")
  rejected = datasets.rejected_path(datasets.make_builder(config))
  assert _one_line(raised.value) == (
      "error: dataset 'csv' has no 'test' crystal (its splits: train); test: kept 0, skipped 2"
      f" (unparsable_cif=2), see {rejected}")
  training = tiny_config(tfds_dir)
  training.dataset.name, training.dataset.path = "csv", str(source)
  training.dataset.data_dir = str(tmp_path / "tfds")
  workdir = tmp_path / "run"
  with pytest.raises(datasets.DatasetError, match="no 'validation' crystal"):
    train.train_and_evaluate(training, str(workdir))
  assert not workdir.exists()


def test_a_dataset_with_nothing_usable_is_refused_in_one_line(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  _write_csv(source / "all.csv", ["material_id", "cif"],
             [["blob", BINARY], ["garbage", "not a CIF"], ["garbage", "still not"]])
  with pytest.raises(datasets.DatasetError) as raised:
    datasets.load_data_sources(_dataset(source, tmp_path / "tfds"))
  # The single list split 0.8 / 0.1 / 0.1: round(0.8 * 3) = 2, round(0.9 * 3) - 2 = 1, none.
  assert _one_line(raised.value) == (
      f"error: no entry of the csv dataset in {source} gives a usable crystal: train: kept 0,"
      " skipped 2 (unparsable_cif=2); validation: kept 0, skipped 1 (unparsable_cif=1); test:"
      " kept 0, skipped 0")


def test_a_metrics_line_cut_short_by_a_kill_is_left_out_on_resume(tmp_path):
  """A run killed (or a disk full) while writing metrics.jsonl leaves half a line: the resumed run
  and the learning curves read the whole lines and drop that one."""
  from crystal_vae import learning_curves, metric_writer  # pylint: disable=import-outside-toplevel
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 2, "split": "train", "loss": 1.5}\n'
                  '{"step": 4, "split": "train", "loss": 1.2}\n{"step": 6, "split": "tr')
  assert [r["step"] for r in learning_curves.read_metrics(tmp_path)] == [2, 4]
  writer = metric_writer.MetricWriter(tmp_path, start_step=4)
  writer.write(6, "train", {"loss": 1.0})
  writer.close()
  assert [r["step"] for r in metric_writer.read_records(path)] == [2, 4, 6]
  assert path.read_text().count("\n") == 3
