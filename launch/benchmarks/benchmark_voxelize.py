"""Voxelisation throughput (structures/s): the jitted, vmapped JAX function vs the numpy reference.

  python launch/benchmarks/benchmark_voxelize.py --perov=../shared/data/perov_5/val.csv.gz \
      --mp=../shared/data/mp_cgcnn/all.csv.gz

perov_5-like cells (5 atoms) and Materials-Project-like cells (20-60 atoms) are the first ones in
the files that pass the limits; when a file is missing, random cells stand in (labelled so).
"""

from __future__ import annotations

import csv
import gzip
import os
import pathlib
import platform
import time

from absl import app
from absl import flags
import jax
import numpy as np

from crystal_vae import crystals
from crystal_vae import process_settings
from crystal_vae import reference
from crystal_vae import voxelize

_PEROV = flags.DEFINE_string("perov", "../shared/data/perov_5/val.csv.gz", "perov_5 CSV.")
_MP = flags.DEFINE_string("mp", "../shared/data/mp_cgcnn/all.csv.gz", "Materials Project CSV.")
_BATCH = flags.DEFINE_integer("batch", 32, "Structures per batch.")
_GRID = flags.DEFINE_integer("grid", 30, "Voxels per axis.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed batches after the warm-up.")
_REFERENCE_COUNT = flags.DEFINE_integer("reference_count", 4,
                                        "Structures timed with the numpy reference.")


def _read_cells(path: str, count: int, min_atoms: int, max_atoms: int,
                box: float) -> list[crystals.Crystal]:
  """The first `count` crystals of a CDVAE-layout CSV that pass the limits and atom range."""
  csv.field_size_limit(1 << 30)
  limits = crystals.CrystalLimits(box=box, max_atoms=max_atoms)
  cells = []
  with gzip.open(path, "rt", newline="") as handle:
    for row in csv.DictReader(handle):
      try:
        crystal = crystals.crystal_from_cif(row["cif"], row["material_id"], limits)
      except crystals.RejectedCrystal:
        continue
      if crystal.num_atoms >= min_atoms:
        cells.append(crystal)
      if len(cells) == count:
        break
  return cells


def _random_cells(rng: np.random.Generator, count: int, min_atoms: int, max_atoms: int,
                  longest: float, box: float) -> list[crystals.Crystal]:
  """Random near-orthogonal cells with sides in [longest / 2, longest) and random atoms."""
  cells = []
  for i in range(count):
    lattice = np.diag(rng.uniform(longest / 2, longest, 3)) + rng.uniform(-0.3, 0.3, (3, 3))
    lattice *= min(1.0, 0.99 * box / np.linalg.norm(lattice, axis=1).max())
    num_atoms = int(rng.integers(min_atoms, max_atoms + 1))
    cells.append(crystals.Crystal(id=f"random-{i}", lattice=lattice,
                                  frac_coords=rng.uniform(size=(num_atoms, 3)),
                                  atomic_numbers=rng.integers(1, 84, num_atoms).astype(np.int32)))
  return cells


def _padded_batch(cells: list[crystals.Crystal]) -> dict[str, np.ndarray]:
  num_atoms = max(cell.num_atoms for cell in cells)
  batch = dict(lattice=np.stack([cell.lattice for cell in cells]).astype(np.float32),
               frac_coords=np.zeros((len(cells), num_atoms, 3), np.float32),
               atomic_numbers=np.zeros((len(cells), num_atoms), np.int32),
               atom_mask=np.zeros((len(cells), num_atoms), bool))
  for i, cell in enumerate(cells):
    batch["frac_coords"][i, :cell.num_atoms] = cell.frac_coords
    batch["atomic_numbers"][i, :cell.num_atoms] = cell.atomic_numbers
    batch["atom_mask"][i, :cell.num_atoms] = True
  return batch


def _jax_throughput(batch: dict[str, np.ndarray], spec: voxelize.GridSpec, representation: str,
                    rotate: bool, random_offset: bool) -> tuple[float, tuple[int, int, int]]:
  """Median structures/s of the jitted function over timed batches after a compiling one."""
  num_images = voxelize.num_images_for(batch["lattice"], spec, representation, rotate)
  device_batch = jax.device_put(batch)

  def seconds(seed: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(voxelize.voxelize_batch(
        device_batch, jax.random.key(seed), spec=spec, representation=representation,
        rotate=rotate, random_offset=random_offset, num_images=num_images))
    return time.perf_counter() - start

  seconds(0)  # Compile.
  times = [seconds(seed) for seed in range(1, _REPEATS.value + 1)]
  return len(batch["lattice"]) / float(np.median(times)), num_images


def _reference_throughput(cells: list[crystals.Crystal], spec: voxelize.GridSpec,
                          representation: str, rotate: bool, random_offset: bool) -> float:
  """Structures/s of the numpy reference, with the placements the JAX function chose."""
  placement = jax.device_get(voxelize.voxelize_batch(
      _padded_batch(cells), jax.random.key(0), spec=spec, representation=representation,
      rotate=rotate, random_offset=random_offset,
      num_images=voxelize.num_images_for(np.stack([cell.lattice for cell in cells]), spec,
                                         representation, rotate)))

  def seconds(i: int) -> float:
    start = time.perf_counter()
    reference.voxelize_reference(cells[i].lattice, cells[i].frac_coords,
                                 cells[i].atomic_numbers, placement["rotation"][i],
                                 placement["offset"][i], spec, representation)
    return time.perf_counter() - start

  seconds(0)  # Warm-up.
  return len(cells) / sum(seconds(i) for i in range(len(cells)))


def main(argv: list[str]) -> None:
  del argv
  spec = voxelize.GridSpec(grid=_GRID.value)
  rng = np.random.default_rng(0)
  datasets = {}
  for name, path, min_atoms, max_atoms, longest in (("perov_5", _PEROV.value, 5, 5, 4.5),
                                                    ("mp", _MP.value, 20, 60, 9.0)):
    if pathlib.Path(path).exists():
      cells = _read_cells(path, _BATCH.value, min_atoms, max_atoms, spec.box)
      label = f"{name} ({path}, first {len(cells)} passing)"
    else:
      cells = _random_cells(rng, _BATCH.value, min_atoms, max_atoms, longest, spec.box)
      label = f"RANDOM {name}-like cells ({path} missing)"
    datasets[label] = cells

  print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), batch {_BATCH.value}, "
        f"grid {spec.grid}^3, box {spec.box} Å, sigma {spec.sigma} Å; median of "
        f"{_REPEATS.value} batches after warm-up; reference on the first "
        f"{_REFERENCE_COUNT.value} structures; load average before {os.getloadavg()[0]:.1f}\n")
  print("| cells | atoms | representation | rotate | random offset | num_images "
        "| jax structures/s | numpy reference structures/s |")
  print("|---|---|---|---|---|---|---|---|")
  for label, cells in datasets.items():
    batch = _padded_batch(cells)
    atoms = f"{min(c.num_atoms for c in cells)}-{max(c.num_atoms for c in cells)}"
    for representation, rotate, random_offset in ((voxelize.UNIT_CELL, False, False),
                                                  (voxelize.UNIT_CELL, True, False),
                                                  (voxelize.REPEAT, False, False),
                                                  (voxelize.REPEAT, True, True)):
      jax_rate, num_images = _jax_throughput(batch, spec, representation, rotate, random_offset)
      reference_rate = _reference_throughput(cells[:_REFERENCE_COUNT.value], spec,
                                             representation, rotate, random_offset)
      print(f"| {label} | {atoms} | {representation} | {rotate} | {random_offset} "
            f"| {num_images} | {jax_rate:.1f} | {reference_rate:.2f} |", flush=True)


if __name__ == "__main__":
  process_settings.apply()
  app.run(main)
