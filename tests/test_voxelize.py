"""Tests of crystal_vae.voxelize against the float64 numpy reference and hand-computed cases."""

import functools
import gzip
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
from pymatgen.core import Structure
import pytest

from crystal_vae import crystals
from crystal_vae import reference
from crystal_vae import voxelize

# The default parameters at a coarser grid, and other ones (species window 3 voxels wide).
SPEC = voxelize.GridSpec(grid=16)
OTHER_SPEC = voxelize.GridSpec(grid=14, box=9.0, sigma=0.8, species_radius=0.8, cutoff_sigmas=4.0)
PROTOTYPES = ("AB_hP6_154_a_b", "A_hR2_166_c", "A2B_mC48_15_ae3f_2f", "ABC3_hR10_167_a_b_e",
              "AB_tI8_141_a_b", "A2B_aP6_2_2i_i", "A3B_cP16_198_b_a")
PLACEMENTS = ((voxelize.UNIT_CELL, False, False), (voxelize.UNIT_CELL, True, False),
              (voxelize.REPEAT, False, False), (voxelize.REPEAT, False, True),
              (voxelize.REPEAT, True, False), (voxelize.REPEAT, True, True))
# The JAX grids use float32 positions (error ~1e-6 Å for coordinates up to ~20 Å, so ~1e-6 Å^2 in
# squared distances near the radius) and compare distances quantised to 2^-23 radius^2; the
# reference uses float64. A voxel whose nearest squared distance is this close to radius^2, or
# whose two nearest species are this close to each other, can legitimately go either way and is
# not compared (in practice none of the test voxels is this close).
SPECIES_AMBIGUITY = 1e-5  # Å^2


def _skewed_lattice(rng: np.random.Generator) -> np.ndarray:
  """A random triclinic lattice: sides 2.5-9.5 Å, angles 30-150°, all heights >= 1 Å."""
  while True:
    lengths = rng.uniform(2.5, 9.5, 3)
    alpha, beta, gamma = np.radians(rng.uniform(30.0, 150.0, 3))
    cos_a, cos_b, cos_g = np.cos(alpha), np.cos(beta), np.cos(gamma)
    c_y = (cos_a - cos_b * cos_g) / np.sin(gamma)
    c_z_sq = 1.0 - cos_b**2 - c_y**2
    if c_z_sq <= 0.0:
      continue
    lattice = np.array([[1.0, 0.0, 0.0], [cos_g, np.sin(gamma), 0.0],
                        [cos_b, c_y, math.sqrt(c_z_sq)]]) * lengths[:, None]
    volume = abs(np.linalg.det(lattice))
    areas = np.linalg.norm(np.cross(lattice[[1, 2, 0]], lattice[[2, 0, 1]]), axis=1)
    if (volume / areas).min() >= 1.0:
      return lattice


def _random_crystals(seed: int, count: int, max_atoms: int = 4) -> list[crystals.Crystal]:
  """Skewed cells (heights down to 1 Å) with 1-max_atoms atoms of random Z in 1-118."""
  rng = np.random.default_rng(seed)
  cells = []
  for i in range(count):
    num_atoms = int(rng.integers(1, max_atoms + 1))
    cells.append(crystals.Crystal(
        id=f"random-{i}", lattice=_skewed_lattice(rng),
        frac_coords=rng.uniform(size=(num_atoms, 3)),
        atomic_numbers=rng.integers(1, 119, num_atoms).astype(np.int32)))
  return cells


@functools.cache
def _prototype_structures() -> dict[str, Structure]:
  """A handful of pymatgen's AFLOW prototypes (longest side < 10 Å), several low-symmetry."""
  package = importlib.util.find_spec("pymatgen.analysis.prototypes").origin
  with gzip.open(pathlib.Path(package).parent / "aflow_prototypes.json.gz", "rt") as handle:
    entries = json.load(handle)
  return {entry["tags"]["aflow"]: Structure.from_dict(entry["snl"])
          for entry in entries if entry["tags"]["aflow"] in PROTOTYPES}


def _prototype_crystals() -> list[crystals.Crystal]:
  return [crystals.crystal_from_structure(structure, name)
          for name, structure in _prototype_structures().items()]


def _padded_batch(cells: list[crystals.Crystal], num_atoms: int | None = None) -> dict:
  num_atoms = num_atoms or max(cell.num_atoms for cell in cells)
  batch = dict(lattice=np.zeros((len(cells), 3, 3), np.float32),
               frac_coords=np.zeros((len(cells), num_atoms, 3), np.float32),
               atomic_numbers=np.zeros((len(cells), num_atoms), np.int32),
               atom_mask=np.zeros((len(cells), num_atoms), bool))
  for i, cell in enumerate(cells):
    batch["lattice"][i] = cell.lattice
    batch["frac_coords"][i, :cell.num_atoms] = cell.frac_coords
    batch["atomic_numbers"][i, :cell.num_atoms] = cell.atomic_numbers
    batch["atom_mask"][i, :cell.num_atoms] = True
  return batch


def _voxelize(batch: dict, spec: voxelize.GridSpec, representation: str, rotate: bool,
              random_offset: bool, seed: int = 0) -> dict[str, np.ndarray]:
  result = voxelize.voxelize_batch(
      batch, jax.random.key(seed), spec=spec, representation=representation, rotate=rotate,
      random_offset=random_offset,
      num_images=voxelize.num_images_for(batch["lattice"], spec, representation, rotate))
  return jax.device_get(result)


def _ambiguous_species(grids: reference.ReferenceGrids, spec: voxelize.GridSpec) -> np.ndarray:
  distances = np.sort(np.stack(list(grids.sq_distance_by_z.values())), axis=0)
  near_radius = np.abs(distances[0] - spec.species_radius**2) <= SPECIES_AMBIGUITY
  if len(distances) == 1:
    return near_radius
  near_tie = ((distances[1] - distances[0] <= SPECIES_AMBIGUITY)
              & (distances[0] <= spec.species_radius**2 + SPECIES_AMBIGUITY))
  return near_radius | near_tie


def _assert_matches_reference(cells, spec, representation, rotate, random_offset):
  batch = _padded_batch(cells)
  result = _voxelize(batch, spec, representation, rotate, random_offset)
  occupied = 0
  for i, cell in enumerate(cells):
    grids = reference.voxelize_reference(
        batch["lattice"][i], batch["frac_coords"][i, :cell.num_atoms], cell.atomic_numbers,
        result["rotation"][i], result["offset"][i], spec, representation)
    error = np.abs(result["density"][i] - grids.density).max() / grids.density.max()
    assert error < 1e-4, (cell.id, error)
    ambiguous = _ambiguous_species(grids, spec)
    assert ambiguous.mean() < 1e-3, cell.id
    np.testing.assert_array_equal(result["species"][i][~ambiguous], grids.species[~ambiguous],
                                  err_msg=cell.id)
    occupied += np.count_nonzero(grids.species)
  assert occupied > 0


@pytest.mark.parametrize("representation,rotate,random_offset", PLACEMENTS)
def test_skewed_cells_and_prototypes_match_reference(representation, rotate, random_offset):
  prototypes = _prototype_crystals()
  assert len(prototypes) == len(PROTOTYPES)
  _assert_matches_reference(_random_crystals(seed=1, count=8) + prototypes, SPEC, representation,
                            rotate, random_offset)


@pytest.mark.parametrize("representation", voxelize.REPRESENTATIONS)
def test_other_grid_parameters_match_reference(representation):
  _assert_matches_reference(_random_crystals(seed=6, count=8), OTHER_SPEC, representation,
                            rotate=True, random_offset=True)


def test_placement_follows_the_conventions():
  spec = voxelize.GridSpec(grid=4)  # The placement does not depend on the grid.
  cells = _random_crystals(seed=2, count=12)
  batch = _padded_batch(cells)
  centres = 0.5 * batch["lattice"].sum(axis=1)

  unit_cell = _voxelize(batch, spec, voxelize.UNIT_CELL, rotate=True, random_offset=False)
  rotation = unit_cell["rotation"]
  np.testing.assert_allclose(rotation @ rotation.transpose(0, 2, 1), np.broadcast_to(np.eye(3),
                                                                                   rotation.shape),
                             atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-5)
  assert len({tuple(np.round(r.ravel(), 4)) for r in rotation}) == len(cells)
  np.testing.assert_allclose(np.einsum("bij,bj->bi", rotation, centres) + unit_cell["offset"],
                             spec.box / 2, atol=1e-4)

  fixed = _voxelize(batch, spec, voxelize.REPEAT, rotate=False, random_offset=False)
  np.testing.assert_array_equal(fixed["rotation"], np.broadcast_to(np.eye(3), (len(cells), 3, 3)))
  np.testing.assert_array_equal(fixed["offset"], 0.0)

  moved = _voxelize(batch, spec, voxelize.REPEAT, rotate=True, random_offset=True)
  unrotated = np.einsum("bji,bj->bi", moved["rotation"], moved["offset"])
  fractions = np.einsum("bj,bji->bi", unrotated, np.linalg.inv(batch["lattice"]))
  assert np.all((fractions > -1e-4) & (fractions < 1.0 + 1e-4))
  assert np.std(fractions) > 0.2


def test_rotations_are_uniform():
  rotations = np.asarray(jax.vmap(voxelize.random_rotation)(
      jax.random.split(jax.random.key(3), 4000)))
  # Haar measure on SO(3): E[R] = 0 and E[trace(R)^2] = 1 (the representation is irreducible).
  assert np.abs(rotations.mean(axis=0)).max() < 0.05
  assert abs(np.mean(np.trace(rotations, axis1=1, axis2=2)**2) - 1.0) < 0.1


def test_density_integrates_to_total_charge():
  spec = voxelize.GridSpec(grid=20, sigma=0.5)  # Voxel = sigma; 5 sigma margin to every face.
  rng = np.random.default_rng(4)
  cells = []
  for i in range(4):
    lattice = _skewed_lattice(rng)
    lattice *= 5.0 / np.linalg.norm(lattice, axis=1).sum()  # Atoms within 2.5 Å of the centre.
    num_atoms = 3 + i
    cells.append(crystals.Crystal(id=str(i), lattice=lattice,
                                  frac_coords=rng.uniform(size=(num_atoms, 3)),
                                  atomic_numbers=rng.integers(1, 100, num_atoms).astype(np.int32)))
  result = _voxelize(_padded_batch(cells), spec, voxelize.UNIT_CELL, rotate=True,
                     random_offset=False)
  charge = result["density"].sum(axis=(1, 2, 3)) * spec.voxel_size**3
  np.testing.assert_allclose(charge, [cell.atomic_numbers.sum() for cell in cells], rtol=1e-4)


def test_images_per_axis_of_a_cubic_cell():
  lattice = 3.0 * np.eye(3)
  spec = voxelize.GridSpec()  # box 10, cutoff 5: the reachable slab is 20 Å = 6.67 cells thick.
  assert voxelize.images_per_axis(lattice, spec, voxelize.REPEAT, False).tolist() == [7, 7, 7]
  # Rotated, it can be (10 sqrt(3) + 10) / 3 = 9.11 cells thick (a lattice axis along a diagonal).
  assert voxelize.images_per_axis(lattice, spec, voxelize.REPEAT, True).tolist() == [10, 10, 10]
  assert voxelize.images_per_axis(lattice, spec, voxelize.UNIT_CELL, True).tolist() == [1, 1, 1]
  np.testing.assert_array_equal(
      voxelize.images_per_axis(np.stack([lattice, np.zeros((3, 3))]), spec, voxelize.REPEAT,
                               False), [[7, 7, 7], [1, 1, 1]])


def test_num_images_for_bounds_the_batch_with_few_shapes():
  """The static counts cover every lattice of the batch, and many batches share few shapes
  (each shape compiles the voxeliser once)."""
  spec = voxelize.GridSpec()
  # A 3 Å cube needs 7 images per axis, a 2.5 x 3 x 9 Å box 9 / 7 / 3: the batch needs 9.
  lattices = np.stack([3.0 * np.eye(3), np.diag([2.5, 3.0, 9.0])])
  assert voxelize.num_images_for(lattices, spec, voxelize.REPEAT, False) == (12, 12, 12)
  assert voxelize.num_images_for(lattices[:1], spec, voxelize.REPEAT, False) == (8, 8, 8)
  assert voxelize.num_images_for(lattices, spec, voxelize.UNIT_CELL, True) == (1, 1, 1)
  rng = np.random.default_rng(0)
  shapes = set()
  for _ in range(100):
    batch = np.stack([np.diag(rng.uniform(2.5, 9.9, 3)) for _ in range(8)])
    counts = voxelize.num_images_for(batch, spec, voxelize.REPEAT, False)
    assert (np.array(counts) >= voxelize.images_per_axis(batch, spec, voxelize.REPEAT,
                                                         False)).all()
    shapes.add(counts)
  assert len(shapes) <= 3, shapes


def _reaching(lattice, frac_coords, atomic_numbers, atom_mask, key, *, spec, rotate, num_images):
  """The placement and the number of atoms + images the JAX code keeps (within the cutoff)."""
  # pylint: disable=protected-access
  rotation, offset = voxelize._placement(lattice, key, spec, voxelize.REPEAT, rotate, True)
  points, numbers = voxelize._points(lattice, frac_coords, atomic_numbers, atom_mask, rotation,
                                     offset, spec, voxelize.REPEAT, num_images)
  return rotation, offset, voxelize._compact(points, numbers, spec, chunk=64)[2]


@pytest.mark.parametrize("rotate", [False, True])
def test_every_image_reaching_the_cube_is_used(rotate):
  cells = _random_crystals(seed=5, count=12, max_atoms=2)
  copies = 8  # Random offsets (and rotations) per cell.
  batch = _padded_batch([cell for cell in cells for _ in range(copies)])
  bounds = voxelize.images_per_axis(batch["lattice"], SPEC, voxelize.REPEAT, rotate)
  count = functools.partial(_reaching, spec=SPEC, rotate=rotate,
                            num_images=tuple(int(n) for n in bounds.max(axis=0)))
  rotations, offsets, counts = jax.device_get(jax.jit(jax.vmap(count))(
      batch["lattice"], batch["frac_coords"], batch["atomic_numbers"], batch["atom_mask"],
      jax.random.split(jax.random.key(5), len(bounds))))
  spans = np.zeros_like(bounds)
  for i, cell in enumerate(cell for cell in cells for _ in range(copies)):
    lattice = batch["lattice"][i].astype(np.float64)
    # Brute force in float64: every translation in a generous range, kept if within the cutoff.
    translations = reference.image_translations(lattice, offsets[i], SPEC)
    distances = []
    for frac in batch["frac_coords"][i, :cell.num_atoms]:
      images = (frac + translations) @ lattice @ rotations[i].T.astype(np.float64) + offsets[i]
      outside = np.maximum(np.maximum(-images, images - SPEC.box), 0.0)
      distance = np.sqrt(np.sum(outside**2, axis=1))
      kept = translations[distance <= SPEC.cutoff].astype(int)
      spans[i] = np.maximum(spans[i], kept.max(axis=0) - kept.min(axis=0) + 1)
      distances.append(distance)
    distances = np.concatenate(distances)
    assert np.all(spans[i] <= bounds[i]), (i, spans[i], bounds[i])
    # float32 vs float64: an image within 1e-4 Å of the cutoff may go either way.
    assert (np.sum(distances <= SPEC.cutoff - 1e-4) <= counts[i]
            <= np.sum(distances <= SPEC.cutoff + 1e-4)), i
  if not rotate:  # The bound is the most over offsets: a few random offsets come close to it.
    shortfall = (bounds - spans).reshape(len(cells), copies, 3).min(axis=1)
    assert shortfall.max() <= 1 and np.mean(shortfall == 0) > 0.5


@pytest.mark.parametrize("representation", voxelize.REPRESENTATIONS)
def test_padding_rows_are_empty(representation):
  spec = voxelize.GridSpec(grid=8)
  cell = _prototype_crystals()[0]
  batch = _padded_batch([cell], num_atoms=cell.num_atoms + 3)
  padded = {name: np.concatenate([value, np.zeros_like(value)]) for name, value in batch.items()}
  result = _voxelize(padded, spec, representation, rotate=False, random_offset=False)
  assert np.all(np.isfinite(result["density"]))
  np.testing.assert_array_equal(result["density"][1], 0.0)
  np.testing.assert_array_equal(result["species"][1], 0)
  grids = reference.voxelize_reference(
      batch["lattice"][0], batch["frac_coords"][0, :cell.num_atoms], cell.atomic_numbers,
      result["rotation"][0], result["offset"][0], spec, representation)
  np.testing.assert_allclose(result["density"][0], grids.density, atol=1e-5 * grids.density.max())
  np.testing.assert_array_equal(result["species"][0], grids.species)


def test_species_tie_goes_to_the_larger_z():
  # Cubic 4 Å cell centred in a 10 Å cube of 1 Å voxels: offset 3 Å, so the centre of voxel
  # (4, 4, 4) is at cartesian (1.5, 1.5, 1.5). O and Fe sit 0.25 Å either side of it along x, in
  # both orders; every other voxel centre is at least 0.75 Å from both, outside the 0.5 Å radius.
  spec = voxelize.GridSpec(grid=10)
  frac = np.array([[1.25, 1.5, 1.5], [1.75, 1.5, 1.5]]) / 4.0
  numbers = np.array([8, 26], np.int32)
  cells = [crystals.Crystal(id=str(order), lattice=4.0 * np.eye(3),
                            frac_coords=frac[list(order)], atomic_numbers=numbers[list(order)])
           for order in ((0, 1), (1, 0))]
  species = _voxelize(_padded_batch(cells), spec, voxelize.UNIT_CELL, rotate=False,
                      random_offset=False)["species"]
  expected = np.zeros((spec.grid,) * 3, np.int32)
  expected[4, 4, 4] = 26
  for cell, grid in zip(cells, species):
    np.testing.assert_array_equal(grid, expected)
    grids = reference.voxelize_reference(cell.lattice, cell.frac_coords, cell.atomic_numbers,
                                         np.eye(3), np.full(3, 3.0), spec, voxelize.UNIT_CELL)
    np.testing.assert_array_equal(grids.species, expected)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "crystal_vae.voxelize", *args],
                        capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_cli_writes_npz_and_png(tmp_path):
  cif = tmp_path / "calcite.cif"
  _prototype_structures()["ABC3_hR10_167_a_b_e"].to(filename=str(cif))
  out = tmp_path / "calcite.npz"
  completed = _run_cli(str(cif), "--representation=repeat", "--rotate", "--random_offset",
                       "--seed=3", "--grid=12", f"--out={out}", "--png")
  assert completed.returncode == 0, completed.stderr
  assert str(out) in completed.stdout and str(out.with_suffix(".png")) in completed.stdout
  assert out.with_suffix(".png").stat().st_size > 0
  saved = np.load(out)
  assert {"density", "species", "rotation", "offset", "box", "grid", "voxel_centres", "lattice",
          "frac_coords", "atomic_numbers"} <= set(saved.files)
  assert saved["density"].shape == saved["species"].shape == (12, 12, 12)
  spec = voxelize.GridSpec(grid=12)
  np.testing.assert_allclose(saved["voxel_centres"], spec.voxel_centres())
  # The saved placement reproduces the grids: cube = rotation @ (frac @ lattice) + offset.
  grids = reference.voxelize_reference(saved["lattice"], saved["frac_coords"],
                                       saved["atomic_numbers"], saved["rotation"],
                                       saved["offset"], spec, voxelize.REPEAT)
  assert np.abs(saved["density"] - grids.density).max() < 1e-4 * grids.density.max()
  assert not np.allclose(saved["rotation"], np.eye(3))


def test_cli_rejects_a_broken_cif_in_one_line(tmp_path):
  cif = tmp_path / "broken.cif"
  cif.write_text("data_broken\n_cell_length_a 3.0\nloop_\n_atom_site_label\n")
  completed = _run_cli(str(cif), f"--out={tmp_path / 'broken.npz'}")
  assert completed.returncode != 0
  lines = [line for line in completed.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, completed.stderr
  assert str(cif) in lines[0] and crystals.UNPARSABLE in lines[0]
  assert not (tmp_path / "broken.npz").exists()
