"""Tests for crystal_vae.input_pipeline: padding, shuffling, resuming, sharding, eval passes."""

import itertools
import json

import jax
import ml_collections
import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae import input_pipeline

MAX_ATOMS = 6


def _records(num_records: int) -> list[dict]:
  """Records as a TFDS data source returns them; record i has 1 + i % 5 atoms."""
  rng = np.random.default_rng(42)
  records = []
  for i in range(num_records):
    num_atoms = 1 + i % 5
    records.append({
        "material_id": f"m-{i}".encode(),
        "lattice": np.diag([3.0 + i, 4.0, 5.0]) + 0.1 * rng.random((3, 3)),
        "frac_coords": rng.random((num_atoms, 3)),
        "atomic_numbers": rng.integers(1, 95, num_atoms).astype(np.int32),
        "properties": json.dumps({"energy": float(i)}).encode(),
    })
  return records


def _take(iterator, count: int) -> list[dict]:
  return list(itertools.islice(iterator, count))


def _indices(batches) -> np.ndarray:
  return np.concatenate([batch["index"] for batch in batches])


def _assert_rows_match_records(batch: dict, records: list[dict]) -> None:
  for row, index in enumerate(batch["index"]):
    record = records[index]
    num_atoms = len(record["atomic_numbers"])
    np.testing.assert_allclose(batch["lattice"][row], record["lattice"], rtol=1e-6)
    np.testing.assert_allclose(batch["frac_coords"][row, :num_atoms], record["frac_coords"],
                               rtol=1e-6)
    np.testing.assert_array_equal(batch["atomic_numbers"][row, :num_atoms],
                                  record["atomic_numbers"])
    np.testing.assert_array_equal(batch["atom_mask"][row], np.arange(MAX_ATOMS) < num_atoms)
    assert not batch["frac_coords"][row, num_atoms:].any()
    assert not batch["atomic_numbers"][row, num_atoms:].any()


def test_pad_crystal_from_record_and_crystal():
  record = _records(3)[2]
  crystal = datasets.record_to_crystal(record)
  for padded in (crystals.pad_crystal(record, 4), crystals.pad_crystal(crystal, 4)):
    assert {k: (v.dtype, v.shape) for k, v in padded.items()} == {
        "lattice": (np.float32, (3, 3)), "frac_coords": (np.float32, (4, 3)),
        "atomic_numbers": (np.int32, (4,)), "atom_mask": (np.bool_, (4,))}
    np.testing.assert_array_equal(padded["atom_mask"], [True, True, True, False])
    np.testing.assert_array_equal(padded["atomic_numbers"][:3], record["atomic_numbers"])
    assert padded["atomic_numbers"][3] == 0 and not padded["frac_coords"][3].any()
    np.testing.assert_allclose(padded["frac_coords"][:3], record["frac_coords"], rtol=1e-6)
  with pytest.raises(ValueError, match="max_atoms"):
    crystals.pad_crystal(record, 2)


def test_train_batches_shapes_padding_and_epochs():
  records = _records(10)
  batches = _take(input_pipeline.train_batches(records, batch_size=4, max_atoms=MAX_ATOMS,
                                               seed=7), 5)
  for batch in batches:
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "lattice": (np.float32, (4, 3, 3)), "frac_coords": (np.float32, (4, MAX_ATOMS, 3)),
        "atomic_numbers": (np.int32, (4, MAX_ATOMS)), "atom_mask": (np.bool_, (4, MAX_ATOMS)),
        "index": (np.int32, (4,)), "valid": (np.bool_, (4,))}
    assert batch["valid"].all()
    _assert_rows_match_records(batch, records)
  indices = _indices(batches)  # 20 rows = exactly two epochs.
  assert sorted(indices[:10]) == list(range(10))
  assert sorted(indices[10:]) == list(range(10))
  assert list(indices[:10]) != list(indices[10:])  # Reshuffled each epoch.
  assert list(indices[:10]) != list(range(10))


def test_train_batches_resume_and_seed():
  records = _records(10)
  stream = lambda seed, start_step=0: input_pipeline.train_batches(
      records, batch_size=3, max_atoms=MAX_ATOMS, seed=seed, start_step=start_step)
  uninterrupted = _take(stream(seed=1), 9)
  resumed = _take(stream(seed=1, start_step=5), 4)
  for expected, actual in zip(uninterrupted[5:], resumed):
    for key in expected:
      np.testing.assert_array_equal(expected[key], actual[key])
  np.testing.assert_array_equal(_indices(_take(stream(seed=1), 9)), _indices(uninterrupted))
  assert list(_indices(_take(stream(seed=2), 9))) != list(_indices(uninterrupted))


def _as_process(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def test_processes_read_their_slices_of_the_single_process_batches(monkeypatch):
  """Two processes with 3 records each per step read, side by side, exactly the 6-record
  batches one process reads: the global batch does not depend on the process count."""
  records = _records(10)
  _as_process(monkeypatch, 0, 1)
  single = [batch["index"] for batch in _take(input_pipeline.train_batches(
      records, batch_size=6, max_atoms=MAX_ATOMS, seed=3), 4)]
  halves = []
  for process in range(2):
    _as_process(monkeypatch, process, 2)
    batches = _take(input_pipeline.train_batches(records, batch_size=3, max_atoms=MAX_ATOMS,
                                                 seed=3), 4)
    for batch in batches:
      _assert_rows_match_records(batch, records)
    halves.append([batch["index"] for batch in batches])
  for step in range(4):
    np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]),
                                  single[step])
  # Within the first epoch (10 records) the two slices are disjoint.
  assert not set(halves[0][0]) & set(halves[1][0])


def test_eval_batches_cover_each_record_once_in_order():
  records = _records(10)
  batches = list(input_pipeline.eval_batches(records, batch_size=4, max_atoms=MAX_ATOMS))
  assert len(batches) == 3
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, [True] * 10 + [False] * 2)
  np.testing.assert_array_equal(_indices(batches)[valid], np.arange(10))
  for batch in batches:
    _assert_rows_match_records(batch, records)  # Padding rows are well-formed crystals too.
    assert batch["lattice"].dtype == np.float32 and batch["index"].dtype == np.int32


def test_eval_batches_shard_over_processes(monkeypatch):
  records = _records(11)
  seen, num_batches = [], set()
  for process in range(3):
    _as_process(monkeypatch, process, 3)
    batches = list(input_pipeline.eval_batches(records, batch_size=2, max_atoms=MAX_ATOMS))
    num_batches.add(len(batches))
    seen += list(_indices(batches)[np.concatenate([b["valid"] for b in batches])])
  assert num_batches == {2}  # ceil(ceil(11 / 3) / 2): the same on every process.
  assert sorted(seen) == list(range(11))


def test_pipeline_reads_a_built_dataset(tmp_path):
  source_dir = tmp_path / "fe"
  source_dir.mkdir()
  for i in range(7):
    structure = Structure(Lattice.cubic(2.5 + 0.1 * i), ["Fe"] * (1 + i % 3),
                          [[0.3 * j, 0.2, 0.3] for j in range(1 + i % 3)])
    (source_dir / f"fe{i}.cif").write_text(str(CifWriter(structure)))
  config = ml_collections.ConfigDict({"name": "cif_dir", "path": str(source_dir),
                                      "data_dir": str(tmp_path / "tfds"),
                                      "split_fractions": (1.0, 0.0, 0.0)})
  source = datasets.load_data_sources(config)["train"]
  records = [source[i] for i in range(len(source))]
  assert len(records) == 7

  train = _take(input_pipeline.train_batches(source, batch_size=7, max_atoms=MAX_ATOMS,
                                             seed=0), 1)[0]
  assert sorted(train["index"]) == list(range(7))
  _assert_rows_match_records(train, records)
  evaluated = list(input_pipeline.eval_batches(source, batch_size=4, max_atoms=MAX_ATOMS))
  np.testing.assert_array_equal(_indices(evaluated)[:7], np.arange(7))
  assert [datasets.record_to_crystal(records[i]).id for i in range(7)] == [
      f"fe{i}" for i in range(7)]
  assert isinstance(datasets.record_to_crystal(records[0]), crystals.Crystal)
