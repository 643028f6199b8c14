"""Reading a crystal in the pose a model knows.

A model trained without random rotations and offsets (`voxel.rotate`, `voxel.random_offset`
False, as the shipped perov_5 models) has seen each crystal in its dataset's setting only: one
orientation of the cell and one atom at the origin. The same crystal described otherwise (a
rebuilt draw with its axes permuted, another atom at the origin) is a different grid to it, and
its heads read it badly: `pretrained/perov5_unit_cell` reads perov_5's GaAsO2F at 0.78 eV/atom
(`heat_all`) as the dataset gives it and at 2.2 with its axes turned and the Ga at the origin
(tests/test_poses.py).

`equivalent_poses` lists a crystal's descriptions that are the same crystal (as given, then the
lattice's point-group operations, which keep the cell's metric, times each atom moved to the
origin) and `best_pose_means` reads each crystal in the one the model reconstructs best (lowest
voxel MSE of its decoded latent mean), keeping the crystal as given unless another pose is
clearly better: in the setting it was trained on where the crystal has one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from pymatgen.core import Structure

from crystal_vae import crystals
from crystal_vae import inference
from crystal_vae import metrics

# Integer matrices with entries in {-1, 0, 1} and determinant ±1: the candidates for the
# lattice's point-group operations in fractional coordinates (enough for a Niggli-like cell).
_UNIMODULAR = np.array(list(itertools.product((-1, 0, 1), repeat=9)), np.float64).reshape(-1, 3, 3)
_UNIMODULAR = _UNIMODULAR[np.isclose(np.abs(np.linalg.det(_UNIMODULAR)), 1.0)]
# The identity first, then the rotations, then the improper operations: of descriptions that
# agree to `_KEY_STEP`, the crystal's own (then a turned one rather than a mirrored one) is kept.
_UNIMODULAR = _UNIMODULAR[np.lexsort((
    -np.linalg.det(_UNIMODULAR), ~np.all(_UNIMODULAR == np.eye(3), axis=(1, 2))))]
# Descriptions whose atoms agree to this (fractional coordinates) are one pose.
_KEY_STEP = 0.01
# Another pose is read instead of the crystal as given only where the model reconstructs it
# with less than this fraction of the given one's voxel MSE (a crystal in its dataset's own
# setting stays as it is; one in a foreign setting has a pose many times better).
_MARGIN = 0.5


def lattice_operations(lattice: np.ndarray, tolerance: float = 0.02) -> np.ndarray:
  """The (K, 3, 3) integer matrices M that keep the metric G = L Lᵀ of `lattice` (rows a, b, c)
  within `tolerance` of its largest entry, M G Mᵀ ≈ G: fractional coordinates f -> f Mᵀ give the
  same crystal turned (or mirrored) within the same cell. The identity is always the first."""
  metric = lattice @ lattice.T
  transformed = np.einsum("kij,jl,kml->kim", _UNIMODULAR, metric, _UNIMODULAR)
  keep = np.abs(transformed - metric).max(axis=(1, 2)) <= tolerance * np.abs(metric).max()
  return _UNIMODULAR[keep]


def equivalent_poses(structure: Structure, tolerance: float = 0.02) -> list[Structure]:
  """`structure` described in each distinct way its own cell allows: as given first, then every
  lattice operation (`lattice_operations`) combined with each atom moved to the origin, the
  lattice kept; descriptions with the same species at the same fractional coordinates (to
  `_KEY_STEP`) once."""
  frac = np.mod(structure.frac_coords, 1.0)
  numbers = np.array(structure.atomic_numbers)
  seen, poses = set(), []
  candidates = [frac] + [np.mod(frac @ operation.T - origin, 1.0)
                         for operation in lattice_operations(structure.lattice.matrix, tolerance)
                         for origin in frac @ operation.T]
  for moved in candidates:
    moved[moved > 1.0 - 1e-3] = 0.0
    grid_points = np.rint(moved / _KEY_STEP).astype(int) % int(round(1 / _KEY_STEP))
    key = tuple(sorted(zip(numbers.tolist(), map(tuple, grid_points.tolist()))))
    if key not in seen:
      seen.add(key)
      poses.append(Structure(structure.lattice, structure.species, moved))
  return poses


def best_pose_means(model: inference.TrainedModel, structures: Sequence[Structure | None],
                    batch_size: int = 32, margin: float = _MARGIN) -> np.ndarray:
  """The latent mean (N, L) of each structure in the pose of `equivalent_poses` whose mean the
  model decodes closest to the pose's own density (voxel MSE), the structure as given unless
  another pose's error is below `margin` times its own; NaN rows where a structure is None or
  does not fit the model's grid (`crystals.RejectedCrystal`). The poses of all structures go
  through the model together, in batches of `batch_size` (the last one padded)."""
  dataset = model.config.dataset
  limits = crystals.CrystalLimits(box=dataset.box, max_z=dataset.max_z,
                                  max_atoms=dataset.max_atoms)
  rows, poses = [], []
  for row, structure in enumerate(structures):
    if structure is None:
      continue
    try:
      described = [crystals.crystal_from_structure(pose, f"pose_{row}_{k}", limits)
                   for k, pose in enumerate(equivalent_poses(structure))]
    except crystals.RejectedCrystal:
      continue
    rows += [row] * len(described)
    poses += described
  means = np.full((len(structures), model.config.model.latent_dim), np.nan, np.float32)
  best = np.full(len(structures), np.inf)
  for begin in range(0, len(poses), batch_size):
    batch = poses[begin:begin + batch_size]
    size = len(batch)
    grids = model.voxelize(batch + batch[-1:] * (batch_size - size))
    condition = model.condition(grids["density"])
    mean, _ = model.encode(grids["density"], condition, grids["composition"])
    errors = metrics.voxel_mse(model.decode_density(mean, condition), grids["density"])
    for position, row, error, latent in zip(range(begin, begin + size), rows[begin:begin + size],
                                            errors[:size], mean[:size]):
      given = position == 0 or rows[position - 1] != row  # the first pose: as given
      if given or error < best[row]:  # the bar: `margin` times the given pose's error
        best[row] = margin * error if given else error
        means[row] = latent
  return means
