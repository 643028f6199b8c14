"""Segmentation: hand-made grids, and true species grids of random and real crystals."""

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from scipy import optimize

from conftest import SPEC, assert_same_atoms, prototypes, unit_cell_positions, voxelize_crystals
from crystal_vae import crystals, segmentation, voxelize

def min_same_species_distance(crystal) -> float:
  structure = crystal.to_structure()
  distances = structure.distance_matrix + np.diag(np.full(len(structure), np.inf))
  same = crystal.atomic_numbers[:, None] == crystal.atomic_numbers[None, :]
  return float(distances[same].min()) if same.any() and len(structure) > 1 else np.inf


def _grid(cubes):
  species = np.zeros((len(cubes), 8, 8, 8), np.int32)
  for index, cube in enumerate(cubes):
    for (i, j, k), z in cube.items():
      species[index, i, j, k] = z
  return species


def test_face_connectivity_species_split_and_batch_independence():
  blob = {(2, 2, 2): 8, (2, 2, 3): 8, (2, 3, 2): 8, (3, 2, 2): 8}
  # A touching blob of another species (split by species), a voxel touching the first blob only
  # along an edge (26- but not 6-connected: separate), and a voxel in the next structure at the
  # same place (structures never connect).
  touching = {(2, 2, 4): 1, (2, 2, 5): 1, (2, 3, 4): 1}
  diagonal = {(3, 3, 3): 8}
  # 1 Å voxels: blobs of about one voxel's radius (`species_radius`) are single atoms.
  found = segmentation.segment_batch(_grid([blob | touching | diagonal, diagonal]), 8.0,
                                     species_radius=1.0, min_size=1)
  assert [len(atoms) for atoms in found] == [3, 1]
  assert sorted(found[0].species.tolist()) == [1, 8, 8]
  o_index = np.flatnonzero((found[0].species == 8) & (found[0].voxels == 4))[0]
  np.testing.assert_allclose(found[0].positions[o_index], np.array([2.25, 2.25, 2.25]) + 0.5)
  np.testing.assert_allclose(found[1].positions[0], [3.5, 3.5, 3.5])


def test_fragments_are_absorbed_or_dropped_and_species_voted():
  big = {(i, j, k): 26 for i in (2, 3) for j in (2, 3) for k in (2, 3)}  # 8 Fe voxels.
  wrong = {(2, 2, 4): 27}  # A 1-voxel Co fragment touching the Fe blob: absorbed.
  lonely = {(6, 6, 6): 8, (6, 6, 7): 8}  # A 2-voxel fragment touching nothing: dropped.
  atoms = segmentation.segment_batch(_grid([big | wrong | lonely]), 8.0, min_size=3,
                                     species_radius=1.0)[0]
  assert atoms.species.tolist() == [26] and atoms.voxels.tolist() == [9]
  expected = np.mean([np.array(v) + 0.5 for v in (big | wrong)], axis=0)
  np.testing.assert_allclose(atoms.positions[0], expected)
  kept = segmentation.segment_batch(_grid([big | wrong | lonely]), 8.0, min_size=1,
                                    species_radius=1.0)[0]
  assert sorted(kept.species.tolist()) == [8, 26, 27]


def test_density_weights_the_centre_and_boundary_is_flagged():
  cube = {(0, 4, 4): 6, (1, 4, 4): 6}
  density = np.zeros((1, 8, 8, 8))
  density[0, 0, 4, 4], density[0, 1, 4, 4] = 1.0, 3.0
  atoms = segmentation.segment_batch(_grid([cube]), 8.0, density=density, min_size=1,
                                     species_radius=1.0)[0]
  np.testing.assert_allclose(atoms.positions[0], [0.5 * 0.25 + 1.5 * 0.75, 4.5, 4.5])
  assert atoms.on_boundary.tolist() == [True]


def test_random_unit_cells_are_recovered_exactly():
  rng = np.random.default_rng(0)
  batch = []
  while len(batch) < 16:
    lattice = np.diag(rng.uniform(3.5, 6.0, 3)) + rng.uniform(-0.5, 0.5, (3, 3))
    count = int(rng.integers(1, 8))
    structure = crystals.Crystal("r", lattice, rng.uniform(0, 1, (count, 3)),
                                 rng.choice([1, 6, 8, 26, 79], count).astype(np.int32))
    crystal = crystals.crystal_from_structure(structure.to_structure(), f"random_{len(batch)}")
    positions = unit_cell_positions(crystal)
    # Atoms must be separate spheres (> 1.4 Å apart for one species, > 1 Å otherwise) and inside.
    distances = crystal.to_structure().distance_matrix + np.diag(np.full(count, np.inf))
    if (distances.min() > 1.0 and min_same_species_distance(crystal) > 1.4
        and np.all((positions > 0.7) & (positions < SPEC.box - 0.7))):
      batch.append(crystal)
  grids = voxelize_crystals(batch, voxelize.UNIT_CELL)
  found = segmentation.segment_batch(grids["species"], SPEC.box)
  for crystal, atoms in zip(batch, found):
    assert_same_atoms(atoms, crystal.atomic_numbers, unit_cell_positions(crystal))
  # The density weighting recovers the same atoms.
  weighted = segmentation.segment_batch(grids["species"], SPEC.box, density=grids["density"])
  for crystal, atoms in zip(batch, weighted):
    assert_same_atoms(atoms, crystal.atomic_numbers, unit_cell_positions(crystal))


@pytest.mark.slow
def test_prototype_unit_cells_are_recovered_exactly():
  usable = [c for c in prototypes() if min_same_species_distance(c) > 1.4
            and np.all((unit_cell_positions(c) > 0.7) & (unit_cell_positions(c) < SPEC.box - 0.7))]
  assert len(usable) > 100
  subset = usable[::6]
  grids = voxelize_crystals(subset, voxelize.UNIT_CELL)
  for crystal, atoms in zip(subset, segmentation.segment_batch(grids["species"], SPEC.box)):
    assert_same_atoms(atoms, crystal.atomic_numbers, unit_cell_positions(crystal))


@pytest.mark.parametrize("random_offset", [False, True])
def test_repeat_grid_interior_atoms_are_recovered(random_offset):
  rocksalt = crystals.crystal_from_structure(
      Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                [[0, 0, 0], [0.5, 0.5, 0.5]]), "nacl")
  grids = voxelize_crystals([rocksalt], voxelize.REPEAT, random_offset=random_offset, seed=3)
  atoms = segmentation.segment(grids["species"][0], SPEC.box)
  # Every periodic image of the true crystal that lies inside the cube, placed like voxelize.
  shifts = np.stack(np.meshgrid(*[np.arange(-4, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
  lattice = rocksalt.lattice.astype(np.float32).astype(np.float64)
  images = ((rocksalt.frac_coords[None] + shifts[:, None]) @ lattice).reshape(-1, 3)
  images += grids["offset"][0]
  numbers = np.tile(rocksalt.atomic_numbers, shifts.shape[0])
  interior = np.all((images > 0.7) & (images < SPEC.box - 0.7), axis=-1)
  inside = np.all((images > -0.5) & (images < SPEC.box + 0.5), axis=-1)
  # Interior images are found exactly; everything found is an image that touches the cube.
  assert_same_atoms(
      segmentation.Atoms(atoms.species[~atoms.on_boundary], atoms.positions[~atoms.on_boundary],
                         atoms.voxels[~atoms.on_boundary], atoms.on_boundary[~atoms.on_boundary]),
      numbers[interior], images[interior])
  assert len(atoms) <= inside.sum()
  distance = np.linalg.norm(atoms.positions[:, None] - images[None, inside], axis=-1)
  np.testing.assert_array_equal(atoms.species, numbers[inside][distance.argmin(axis=1)])
  # Atoms cut by a face have their centre pulled inwards, by less than the species radius.
  assert np.all(distance.min(axis=1) < SPEC.species_radius)


def test_species_grid_of_atoms_draws_spheres_of_the_species_radius():
  # One atom at a voxel centre (h = 1/3 Å): itself, 6 face and 12 edge neighbours (0.33 and
  # 0.47 Å away) lie within 0.5 Å, the 8 corner ones (0.58 Å) do not; the nearer atom wins.
  atoms = segmentation.Atoms(species=np.array([8, 26], np.int32),
                             positions=np.array([[(10 + 0.5) / 3] * 3, [(13 + 0.5) / 3] * 3]),
                             voxels=np.zeros(2, np.int64), on_boundary=np.zeros(2, bool))
  grid = segmentation.species_grid(atoms, 30, 10.0, 0.5)
  assert np.sum(grid == 8) == 19 and np.sum(grid == 26) == 19
  assert grid[10, 10, 10] == 8 and grid[11, 11, 10] == 8 and grid[11, 11, 11] == 0


@pytest.mark.parametrize("distance", [0.74, 0.9, 1.1, 1.25])
def test_close_atoms_of_one_species_are_split(distance):
  """H2 (0.74 Å), N2-like and O-O pairs: one face-connected component of the species grid, two
  atoms; positions within 0.15 Å (overlapping balls bias each half's centre slightly)."""
  rng = np.random.default_rng(int(distance * 100))
  for _ in range(5):
    centre = rng.uniform(4.0, 6.0, 3)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    positions = np.stack([centre, centre + distance * direction])
    crystal = crystals.Crystal(id="pair", lattice=20.0 * np.eye(3),
                               frac_coords=positions / 20.0, atomic_numbers=np.array([7, 7]))
    grids = voxelize_crystals([crystal], "repeat")
    atoms = segmentation.segment(grids["species"][0], SPEC.box)
    assert len(atoms) == 2
    found = np.linalg.norm(atoms.positions[:, None] - positions[None], axis=-1)
    rows, cols = optimize.linear_sum_assignment(found)
    assert found[rows, cols].max() < 0.15


def test_a_linear_chain_of_three_is_three_atoms():
  positions = np.array([[3.8, 5.0, 5.0], [5.0, 5.0, 5.0], [6.2, 5.1, 5.0]])  # azide-like N3
  crystal = crystals.Crystal(id="azide", lattice=20.0 * np.eye(3), frac_coords=positions / 20.0,
                             atomic_numbers=np.array([7, 7, 7]))
  atoms = segmentation.segment(voxelize_crystals([crystal], "repeat")["species"][0], SPEC.box)
  assert_same_atoms(atoms, [7, 7, 7], positions)


def test_single_atoms_are_never_split():
  rng = np.random.default_rng(1)
  positions = rng.uniform(1.0, 9.0, (40, 3))
  keep = [0]
  for index in range(1, len(positions)):  # atoms at least 1.5 Å apart
    if np.linalg.norm(positions[keep] - positions[index], axis=1).min() > 1.5:
      keep.append(index)
  positions = positions[keep]
  crystal = crystals.Crystal(id="gas", lattice=20.0 * np.eye(3), frac_coords=positions / 20.0,
                             atomic_numbers=np.full(len(positions), 6))
  atoms = segmentation.segment(voxelize_crystals([crystal], "repeat")["species"][0], SPEC.box)
  assert_same_atoms(atoms, [6] * len(positions), positions)


def test_an_empty_species_grid_gives_no_atoms():
  """A grid where nothing is segmented (e.g. a model without a segmenter) has no atoms."""
  [atoms] = segmentation.segment_batch(np.zeros((1, 6, 6, 6), np.int32), 10.0,
                                       density=np.ones((1, 6, 6, 6), np.float32))
  assert len(atoms.species) == 0 and atoms.positions.shape == (0, 3)
