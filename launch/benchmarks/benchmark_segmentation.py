"""Segmentation speed, and the oracle (true grids -> crystals) match rate, on real cells.

True species grids of perov_5 validation cells and Materials-Project (mp_cgcnn) cells are built
with `voxelize_batch` (unrotated); `segment_batch` is timed over them (best of `--repeats`). With
`--oracle N`, the first N cells of each set also go through `reconstruct_repeat` and
`reconstruct_unit_cell` (true lattice, unrotated) and are compared with the true structure by
`StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)`, also requiring the exact primitive atom count.
Usage:
  python launch/benchmarks/benchmark_segmentation.py [--num 256] [--batch 64] [--grid 30]
      [--oracle 200] [--random_offset]
"""

import argparse
import csv
import gzip
import sys
import time
import warnings

import jax
import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher

from crystal_vae import crystals, process_settings, reconstruction, segmentation, voxelize

DATASETS = (("perov_5", "/work/shared/data/perov_5/val.csv.gz"),
            ("mp_cgcnn", "/work/shared/data/mp_cgcnn/all.csv.gz"))


def read_cells(path: str, count: int, limits: crystals.CrystalLimits) -> list[crystals.Crystal]:
  csv.field_size_limit(sys.maxsize)
  cells = []
  with gzip.open(path, "rt", newline="") as handle:
    for row in csv.DictReader(handle):
      try:
        cells.append(crystals.crystal_from_cif(row["cif"], row["material_id"], limits))
      except crystals.RejectedCrystal:
        continue
      if len(cells) == count:
        break
  return cells


def voxelize_cells(cells, spec, representation, random_offset, batch_size, seed=0):
  """Species and density grids (N, G, G, G) of `cells`, batch by batch."""
  species, density = [], []
  for start in range(0, len(cells), batch_size):
    batch = crystals.stack_crystals(cells[start:start + batch_size])
    result = voxelize.voxelize_batch(
        batch, jax.random.key(seed + start), spec=spec, representation=representation,
        rotate=False, random_offset=random_offset,
        num_images=voxelize.num_images_for(batch["lattice"], spec, representation, False))
    species.append(np.asarray(result["species"]))
    density.append(np.asarray(result["density"]))
  return np.concatenate(species), np.concatenate(density)


def oracle(cells, atoms, representation, spec) -> tuple[int, int, dict[str, int]]:
  """(matches with exact atom count, valid reconstructions, invalid reasons)."""
  matcher = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
  matches, valid, reasons = 0, 0, {}
  for cell, found in zip(cells, atoms):
    if representation == voxelize.REPEAT:
      result = reconstruction.reconstruct_repeat(found, spec.box)
    else:
      result = reconstruction.reconstruct_unit_cell(found, cell.lattice,
                                                    spec.box)
    if not result.valid:
      reasons[result.reason] = reasons.get(result.reason, 0) + 1
      continue
    valid += 1
    true = cell.to_structure()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      matches += (matcher.fit(result.structure, true)
                  and len(result.structure) == len(true.get_primitive_structure()))
  return matches, valid, reasons


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=256, help="cells per dataset")
  parser.add_argument("--batch", type=int, default=64, help="segment_batch batch size")
  parser.add_argument("--grid", type=int, default=30)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--oracle", type=int, default=0, help="cells per dataset for the oracle")
  parser.add_argument("--random_offset", action="store_true", help="repeat: random origin")
  args = parser.parse_args()
  spec = voxelize.GridSpec(grid=args.grid)
  limits = crystals.CrystalLimits(box=spec.box)
  print("command: python " + " ".join(sys.argv))
  print(f"{'dataset':10s} {'repr':9s} {'cells':>5s} {'atoms/cell':>10s} {'weights':8s} "
        f"{'structures/s':>12s}")
  oracle_rows = []
  for name, path in DATASETS:
    cells = read_cells(path, max(args.num, args.oracle), limits)
    for representation in voxelize.REPRESENTATIONS:
      species, density = voxelize_cells(cells, spec, representation, args.random_offset, 64)
      for weights in ("uniform", "density"):
        best = np.inf
        for _ in range(args.repeats):
          start = time.perf_counter()
          atoms = []
          for first in range(0, min(args.num, len(cells)), args.batch):
            stop = min(first + args.batch, args.num)
            atoms += segmentation.segment_batch(
                species[first:stop], spec.box,
                density=density[first:stop] if weights == "density" else None)
          best = min(best, time.perf_counter() - start)
        print(f"{name:10s} {representation:9s} {len(atoms):5d} "
              f"{np.mean([len(a) for a in atoms]):10.1f} {weights:8s} {len(atoms) / best:12.1f}")
      if args.oracle:
        count = min(args.oracle, len(cells))
        atoms = segmentation.segment_batch(species[:count], spec.box)
        oracle_rows.append((name, representation, count,
                            *oracle(cells[:count], atoms, representation, spec)))
  for name, representation, count, matches, valid, reasons in oracle_rows:
    print(f"oracle {name:10s} {representation:9s} match {matches}/{count} "
          f"({100 * matches / count:.1f}%), valid {valid}, invalid {reasons}")


if __name__ == "__main__":
  process_settings.apply()
  main()
