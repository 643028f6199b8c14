"""Padded numpy batches of crystals from a random-access source, with grain.

A source is any sequence of records as stored by `datasets.CrystalDataset` (or of
`crystals.Crystal`). A batch is a dict of numpy arrays with a static atom axis A = max_atoms:

- `lattice` float32 (B, 3, 3), rows are the lattice vectors;
- `frac_coords` float32 (B, A, 3) in [0, 1), zeros where padded;
- `atomic_numbers` int32 (B, A), 0 where padded;
- `atom_mask` bool (B, A);
- `index` int32 (B,), the position of the record in its split;
- `valid` bool (B,), False for the padding rows of a final eval batch;
- `properties` float32 (B, P), the named numeric properties (NaN where missing), if any named.

Training: every process shuffles the whole source alike and reads its own slice of each global
batch, so the global batch of a step is the same whatever the number of processes. Evaluation:
each process reads the records `process_index::process_count`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from crystal_vae import crystals

Batch = dict[str, np.ndarray]

# Batches are assembled by a small thread pool ahead of the consumer.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _example(index: int, record: Any, max_atoms: int, properties: Sequence[str],
             valid: bool = True) -> Batch:
  example = crystals.pad_crystal(record, max_atoms, properties)
  example["index"] = np.int32(index)
  example["valid"] = np.bool_(valid)
  return example


def _shard(num_records: int) -> tuple[int, int]:
  """This process's (shard index, shard count); fails if some shard would be empty."""
  process_index, process_count = jax.process_index(), jax.process_count()
  if num_records < process_count:
    raise ValueError(f"{num_records} records cannot be shared by {process_count} processes")
  return process_index, process_count


def train_batches(source: Sequence[Any], *, batch_size: int, max_atoms: int, seed: int,
                  start_step: int = 0, properties: Sequence[str] = ()) -> Iterator[Batch]:
  """Infinite shuffled batches of this process's `batch_size`: its slice of the global batch
  (`batch_size` x process count), which depends only on (seed, step).

  Each epoch is a fresh permutation of the source (derived from `seed` and the epoch); batches
  run across epoch boundaries. Starting at `start_step` yields exactly the batches an
  uninterrupted iterator would have yielded from that step on.
  """
  num_records = len(source)
  process_index, process_count = _shard(num_records)
  # Mix the seed so that runs with seeds s and s + 1 do not share epochs (grain adds the
  # epoch number to the shuffle seed).
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  mine = slice(process_index * batch_size, (process_index + 1) * batch_size)

  def read(global_indices: np.ndarray) -> Batch:
    examples = [_example(int(index), source[int(index)], max_atoms, properties)
                for index in global_indices[mine]]
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}

  dataset = (grain.MapDataset.range(num_records)
             .shuffle(seed=shuffle_seed)
             .repeat()
             .batch(batch_size * process_count, drop_remainder=True)
             .map(read))
  return iter(dataset[start_step:].to_iter_dataset(_READ_OPTIONS))


def eval_batches(source: Sequence[Any], *, batch_size: int, max_atoms: int,
                 properties: Sequence[str] = ()) -> Iterator[Batch]:
  """One in-order pass over this process's shard.

  Every process yields the same number of batches; rows past the end of the shard repeat the
  shard's first record (a well-formed crystal) with `valid` False.
  """
  num_records = len(source)
  if not num_records:
    return iter(())
  process_index, process_count = _shard(num_records)
  shard_size = -(-num_records // process_count)
  num_batches = -(-shard_size // batch_size)

  def example(position: int) -> Batch:
    index = process_index + position * process_count
    if index < num_records:
      return _example(index, source[index], max_atoms, properties)
    return _example(process_index, source[process_index], max_atoms, properties, valid=False)

  dataset = grain.MapDataset.range(num_batches * batch_size).map(example).batch(batch_size)
  return iter(dataset.to_iter_dataset(_READ_OPTIONS))
