"""Reconstruction: true grids -> crystals matching the truth; CIF round trip; invalid reasons."""

import csv
import gzip
import itertools
import pathlib
import sys

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

import crystal_vae
from crystal_vae import crystals, reconstruction, segmentation, species_choice, voxelize, writing
from conftest import MATCHER, SPEC, matches, representative_prototypes, voxelize_crystals

PEROV_VAL = pathlib.Path(crystal_vae.__file__).parent / "data" / "perov_5" / "val.csv.gz"  # embedded


def _atoms(species, positions, on_boundary=None) -> segmentation.Atoms:
  species = np.asarray(species, np.int32)
  return segmentation.Atoms(
      species=species, positions=np.asarray(positions, np.float64).reshape(-1, 3),
      voxels=np.full(species.shape[0], 10),
      on_boundary=(np.zeros(species.shape[0], bool) if on_boundary is None
                   else np.asarray(on_boundary)))


@pytest.mark.slow
def test_repeat_oracle_recovers_prototypes_at_any_origin():
  cells = representative_prototypes()
  assert len(cells) >= 10
  grids = voxelize_crystals(cells, voxelize.REPEAT, random_offset=True, seed=1)
  assert np.all(np.abs(grids["offset"]).max(axis=1) > 0.1)
  atoms = segmentation.segment_batch(grids["species"], SPEC.box)
  failures = [c.id for c, a in zip(cells, atoms)
              if not matches(reconstruction.reconstruct_repeat(a, SPEC.box), c)]
  assert not failures


def _perov_cells(count):
  csv.field_size_limit(sys.maxsize)
  with gzip.open(PEROV_VAL, "rt", newline="") as handle:
    rows = [row for _, row in zip(range(count), csv.DictReader(handle))]
  return [crystals.crystal_from_cif(row["cif"], row["material_id"]) for row in rows]


def test_repeat_and_unit_cell_oracles_recover_perov_5():
  cells = _perov_cells(24)
  repeat = voxelize_crystals(cells, voxelize.REPEAT)  # Cell corner at the cube origin.
  for cell, atoms in zip(cells, segmentation.segment_batch(repeat["species"], SPEC.box)):
    assert matches(reconstruction.reconstruct_repeat(atoms, SPEC.box), cell), cell.id
  unit = voxelize_crystals(cells, voxelize.UNIT_CELL)
  for cell, atoms in zip(cells, segmentation.segment_batch(unit["species"], SPEC.box)):
    assert matches(reconstruction.reconstruct_unit_cell(atoms, cell.lattice, SPEC.box), cell)


def test_unit_cell_uses_the_oriented_lattice_of_a_rotated_cell():
  """A randomly rotated unit cell is rebuilt from the lattice rotated the same way."""
  cells = _perov_cells(4)
  grids = voxelize_crystals(cells, voxelize.UNIT_CELL, rotate=True)
  for cell, atoms, rotation in zip(cells, segmentation.segment_batch(grids["species"], SPEC.box),
                                   grids["rotation"]):
    oriented = cell.lattice @ np.asarray(rotation).T
    assert matches(reconstruction.reconstruct_unit_cell(atoms, oriented, SPEC.box), cell)
    assert not matches(reconstruction.reconstruct_unit_cell(atoms, cell.lattice, SPEC.box), cell)


def test_unit_cell_merges_periodic_duplicates_and_uses_the_cell_centre():
  lattice = Lattice.from_parameters(4.0, 4.0, 4.0, 90, 90, 90)
  corner = SPEC.box / 2 - 2.0  # Cube coordinate of the cell origin.
  # Cs at the origin seen twice (at frac 0 and, across the cell, frac 1 - 0.01), Cl at the centre.
  atoms = _atoms([55, 55, 17], [[corner] * 3, [corner + 3.96, corner, corner], [SPEC.box / 2] * 3])
  result = reconstruction.reconstruct_unit_cell(atoms, lattice.matrix, SPEC.box)
  assert result.valid and len(result.structure) == 2
  cscl = Structure(lattice, ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
  assert MATCHER.fit(result.structure, cscl)
  caesium = [site for site in result.structure if site.specie.Z == 55][0]
  frac = np.mod(caesium.frac_coords + 0.5, 1.0) - 0.5
  np.testing.assert_allclose(np.abs(frac), [0.005, 0, 0], atol=1e-9)


def test_repeat_votes_species_and_drops_unsupported_sites():
  lattice = 2.5 * np.eye(3)
  shifts = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
  positions = shifts @ lattice + 1.0  # A simple cubic Fe lattice, origin at (1, 1, 1).
  species = np.full(positions.shape[0], 26)
  species[5] = 27  # One copy decoded as Co: outvoted.
  noise = [[2.2, 2.3, 2.2]]  # One spurious atom: a site seen once among 27 places.
  atoms = _atoms(np.concatenate([species, [8]]), np.concatenate([positions, noise]))
  # Each wrong atom misses as source and as target of a translation: 3 misses in ~50 checks.
  result = reconstruction.reconstruct_repeat(atoms, SPEC.box, min_fraction=0.9, veto_fraction=0.9)
  assert result.valid
  assert [site.specie.Z for site in result.structure] == [26]
  np.testing.assert_allclose(result.structure.lattice.abc, [2.5] * 3, atol=1e-6)


def test_fitted_atom_split_between_two_faces_of_the_cell_is_one_atom():
  """SrTiO3 with its O at (0.5, 0, 0.5) decoded as two halves, Z 4 each, 0.4 Å beyond the cell's
  b = 0 and b = 1 faces (0.8 Å apart across the periodic boundary): one O, Z 8, on the face
  (the halves' Z-weighted mean), its species the sum of theirs."""
  a = 4.0
  corner = SPEC.box / 2 - a / 2
  sites = {38: [0, 0, 0], 22: [0.5, 0.5, 0.5], 8: [0.5, 0.5, 0]}
  species = [38, 22, 8, 8, 8, 8]
  frac = [sites[38], sites[22], sites[8], [0, 0.5, 0.5], [0.5, -0.1, 0.5], [0.5, 1.1, 0.5]]
  fitted = [38, 22, 8, 8, 4, 4]
  atoms = _atoms(fitted, corner + a * np.array(frac, np.float64))
  result = reconstruction.reconstruct_unit_cell(atoms, a * np.eye(3), SPEC.box, fitted_z=True)
  assert result.valid, result.detail
  srtio3 = Structure(Lattice.cubic(a), ["Sr", "Ti", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]])
  assert MATCHER.fit(result.structure, srtio3)
  assert sorted(site.specie.Z for site in result.structure) == sorted(species[:5])
  # The decoded atoms, each with the species of the site it became: both halves are O.
  np.testing.assert_array_equal(result.cube_atoms.species, species)
  np.testing.assert_array_equal(result.cube_atoms.positions, atoms.positions)
  # Counted as species (votes), the same halves are two O sites 0.8 Å apart: no perovskite.
  voted = reconstruction.reconstruct_unit_cell(atoms, a * np.eye(3), SPEC.box)
  assert not (voted.valid and MATCHER.fit(voted.structure, srtio3))


def test_fitted_unit_cell_sites_beyond_the_compositions_atom_count_are_dropped():
  """SrTiO3 read off a unit-cell density with a spurious Z 5 atom 1.9 Å from Ti: the sites' 89
  electrons over the composition's mean Z 16.8 are 5.3 atoms, so the lightest site goes (with
  its decoded atom) and the cell is SrTiO3; without a composition it stays."""
  a = 4.0
  corner = SPEC.box / 2 - a / 2
  frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5],
                   [0.25, 0.25, 0.75]])
  atoms = _atoms([38, 22, 8, 8, 8, 5], corner + a * frac)
  composition = np.zeros(101)
  composition[[38, 22, 8]] = [0.2, 0.2, 0.6]
  result = reconstruction.reconstruct_unit_cell(atoms, a * np.eye(3), SPEC.box, fitted_z=True,
                                                composition=composition, site_z_sigma=2.0)
  srtio3 = Structure(Lattice.cubic(a), ["Sr", "Ti", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]])
  assert result.valid and MATCHER.fit(result.structure, srtio3)
  np.testing.assert_array_equal(result.cube_atoms.species, [38, 22, 8, 8, 8])
  np.testing.assert_array_equal(result.cube_atoms.positions, atoms.positions[:5])
  alone = reconstruction.reconstruct_unit_cell(atoms, a * np.eye(3), SPEC.box, fitted_z=True)
  assert len(alone.structure) == 6


def test_a_symmetrised_unit_cell_moves_each_decoded_atom_with_its_site():
  """SrTiO3 decoded with its O up to 0.3 Å off the face centres and a lattice head's cell 3.9 ±
  0.05 Å: symmetrised within 0.8 Å, the cell is a cube (Pm-3m at 1e-5 Å) centred in the cube,
  and every decoded atom, both copies of the split face atom too, sits where the ideal
  perovskite of that cell has it."""
  lattice = np.diag([3.95, 3.88, 3.9]) + np.array([[0, 0.03, 0], [0, 0, -0.02], [0.01, 0, 0]])
  sites = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
  noise = np.array([[0, 0, 0], [0.04, 0, 0], [0.3, 0, 0], [0, 0.05, 0.2], [0, -0.2, -0.15]])
  frac = np.vstack([sites, sites[2] + [0, 0, 1]]) + np.vstack([noise, noise[2]]) / 3.9
  positions = frac @ lattice + SPEC.box / 2 - 0.5 * lattice.sum(axis=0)
  atoms = _atoms([38, 22, 8, 8, 8, 8], positions)
  result = reconstruction.reconstruct_unit_cell(atoms, lattice, SPEC.box, symprec=0.8)
  assert result.valid, result.detail
  assert result.structure.get_space_group_info(symprec=1e-5)[1] == 221
  a = result.structure.lattice.a
  np.testing.assert_allclose(result.structure.lattice.abc, [a] * 3, atol=1e-9)
  # The new cell's rows keep the old orientation (a cube of side a, nearly the old rows).
  cell = a * np.eye(3)
  assert np.abs(cell - lattice).max() < 0.06
  ideal = np.vstack([sites, sites[2] + [0, 0, 1]])
  moved = result.cube_atoms.positions - SPEC.box / 2 + 0.5 * cell.sum(axis=0)
  offset = moved[0] - ideal[0] * a  # the Sr site: the new origin (the others follow it)
  np.testing.assert_allclose(moved - offset, ideal * a, atol=0.02)
  assert np.linalg.norm(offset) < 0.05
  np.testing.assert_array_equal(result.cube_atoms.species, [38, 22, 8, 8, 8, 8])


@pytest.mark.parametrize("make, reason", [
    (lambda: reconstruction.reconstruct_repeat(_atoms([], []), SPEC.box),
     reconstruction.NO_ATOMS),
    (lambda: reconstruction.reconstruct_unit_cell(_atoms([], []), 4 * np.eye(3), SPEC.box),
     reconstruction.NO_ATOMS),
    # Atoms without any repeated pattern.
    (lambda: reconstruction.reconstruct_repeat(
        _atoms([8, 8, 8, 26], [[2, 2, 2], [3.1, 5.2, 7.9], [7.3, 2.9, 4.4], [5, 5, 5]]),
        SPEC.box), reconstruction.NO_LATTICE),
    # A 2-D pattern (a square net of atoms in one plane) spans no 3-D lattice.
    (lambda: reconstruction.reconstruct_repeat(
        _atoms([6] * 16, [[1 + 2.5 * i, 1 + 2.5 * j, 5] for i in range(4) for j in range(4)]),
        SPEC.box), reconstruction.NO_LATTICE),
    (lambda: reconstruction.reconstruct_unit_cell(
        _atoms([8], [[5, 5, 5]]), [[4, 0, 0], [0, 4, 0], [4, 4, 0]], SPEC.box),  # coplanar
     reconstruction.INVALID_LATTICE),
    (lambda: reconstruction.reconstruct_unit_cell(
        _atoms([8], [[5, 5, 5]]), np.full((3, 3), np.nan), SPEC.box),
     reconstruction.INVALID_LATTICE),
    (lambda: reconstruction.reconstruct_unit_cell(
        _atoms([8, 8], [[5, 5, 5], [5.4, 5, 5]]), 4 * np.eye(3), SPEC.box),
     reconstruction.ATOMS_TOO_CLOSE),
])
def test_invalid_samples_have_their_reason(make, reason):
  result = make()
  assert not result.valid and result.structure is None
  assert result.reason == reason and result.detail


def test_cif_round_trip_and_invalid_list(tmp_path):
  shifts = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)
  cscl = Structure(Lattice.cubic(3.0), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
  # A repeat cube of CsCl (origin at (1.2, 1.1, 1.3)) and a unit cell of rocksalt-like NaCl.
  cube = np.concatenate([(shifts + f) @ cscl.lattice.matrix + [1.2, 1.1, 1.3]
                         for f in cscl.frac_coords])
  results = [
      reconstruction.reconstruct_repeat(_atoms([55] * 27 + [17] * 27, cube), SPEC.box),
      reconstruction.reconstruct_unit_cell(_atoms([11, 17], [[3.5, 3.5, 3.5], [5, 5, 5]]),
                                           3.0 * np.eye(3), SPEC.box),
      reconstruction.reconstruct_repeat(_atoms([], []), SPEC.box)]
  truths = [cscl, Structure(Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])]
  assert writing.write_cifs(results, ["cscl", "nacl", "empty"], tmp_path) == (2, 1)
  for name, result, truth in zip(["cscl", "nacl"], results, truths):
    read = crystals.read_cif_file(tmp_path / f"{name}.cif")
    assert MATCHER.fit(read.to_structure(), truth) and len(read.to_structure()) == 2
    np.testing.assert_allclose(read.lattice, result.structure.lattice.matrix, atol=1e-4)
  with open(tmp_path / "invalid.csv", newline="") as handle:
    rows = list(csv.DictReader(handle))
  assert [(row["id"], row["reason"]) for row in rows] == [("empty", reconstruction.NO_ATOMS)]


def test_composition_counts_and_site_assignment_by_hand():
  fractions = np.zeros(40)
  fractions[[3, 8]] = [1 / 3, 2 / 3]  # Li O2 over 4 sites: 1.33, 2.67 -> 1 Li, 3 O
  np.testing.assert_array_equal(species_choice.composition_counts(fractions, 4)[[3, 8]], [1, 3])
  fractions[0] = 0.5  # "no atom" is never an element: the rest are renormalised
  np.testing.assert_array_equal(species_choice.composition_counts(fractions, 3)[[0, 3, 8]],
                                [0, 1, 2])


def test_species_from_composition_by_hand():
  """Ga As O2 F (fractions 0.2, 0.2, 0.4, 0.2), sites at Z 32.4, 8.3, 32.6, 8.6, 9.2, σ = 1.5
  (2σ² = 4.5). Each site alone would take its nearest element of the composition: As, As. For the
  cell: Ga As (sorted: 32.4 -> Ga, 32.6 -> As) costs (1.4² + 0.4²) / 4.5 = 0.471 with the
  composition exact (KL 0); As2 costs (0.6² + 0.4²) / 4.5 = 0.116 plus 2 log(2 / (5 · 0.2)) =
  1.386 for the composition: Ga As wins. The light sites in order of Z take O, O, F."""
  ga_as_o2f = np.zeros(40)
  ga_as_o2f[[31, 33, 8, 9]] = [0.2, 0.2, 0.4, 0.2]
  species = species_choice.species_from_composition([32.4, 8.3, 32.6, 8.6, 9.2], ga_as_o2f, 1.5)
  np.testing.assert_array_equal(species, [31, 8, 33, 8, 9])
  # A site far from every element of the composition takes the density's own: at Z 17, F costs
  # 8² / 4.5 = 14.2, Cl log(1 / (5 · 1e-6)) = 12.2 for the composition and 0 for Z: Cl; the
  # other light sites then take O and F (O F: 1 · log(1 / 2) = -0.69 for the composition,
  # 0.16 / 4.5 for 8.6 as F; O2: 0, 0.36 / 4.5). At 16, F costs 7² / 4.5 = 10.9 < 12.2: F.
  for z, expected in ((17.0, [31, 8, 33, 9, 17]), (16.0, [31, 8, 33, 8, 9])):
    species = species_choice.species_from_composition([32.4, 8.3, 32.6, 8.6, z], ga_as_o2f, 1.5)
    np.testing.assert_array_equal(species, expected)
  with pytest.raises(ValueError, match="site_z_sigma"):
    species_choice.species_from_composition([8.0], ga_as_o2f, 0.0)


def test_species_from_composition_is_the_best_assignment_of_all():
  """Against brute force over every multiset of elements 1..10 and every order (n ≤ 4 sites):
  the chosen species score as high as the best, with the score written out independently."""
  rng = np.random.default_rng(0)

  def score(species, site_z, fractions, sigma):
    counts = np.bincount(species, minlength=fractions.size)[1:]
    f = np.maximum(fractions[1:], 1e-6)
    prior = np.sum(np.where(counts > 0, counts * np.log(np.maximum(counts, 1)
                                                        / (len(species) * f)), 0.0))
    return -np.sum((np.asarray(site_z) - species) ** 2) / (2 * sigma ** 2) - prior

  for _ in range(40):
    n = int(rng.integers(1, 5))
    fractions = np.zeros(11)
    fractions[rng.choice(np.arange(1, 11), size=3, replace=False)] = rng.dirichlet(np.ones(3))
    site_z = rng.uniform(0.5, 10.5, size=n)
    sigma = float(rng.choice([0.5, 1.5, 3.0]))
    chosen = species_choice.species_from_composition(site_z, fractions, sigma)
    best = max(score(np.array(option), site_z, fractions, sigma)
               for option in itertools.product(range(1, 11), repeat=n))
    assert score(chosen, site_z, fractions, sigma) == pytest.approx(best, abs=1e-9)


def test_a_lattice_too_sparse_for_the_atoms_is_read_off_the_density():
  """One atom per 6 Å cubic cell: 8 atoms in the cube, one away from the faces, so no
  translation between atoms can be checked; the density's own translations give the lattice."""
  crystal = crystals.Crystal(id="sparse", lattice=6.0 * np.eye(3),
                             frac_coords=np.array([[0.3, 0.4, 0.6]]), atomic_numbers=np.array([29]))
  grids = voxelize_crystals([crystal], "repeat")
  atoms = segmentation.segment(grids["species"][0], SPEC.box)
  assert reconstruction.reconstruct_repeat(atoms, SPEC.box).reason == reconstruction.NO_LATTICE
  rebuilt = reconstruction.reconstruct_repeat(atoms, SPEC.box, density=grids["density"][0])
  assert rebuilt.valid and MATCHER.fit(rebuilt.structure, crystal.to_structure())
  assert len(rebuilt.structure) == 1


def _long_cell() -> crystals.Crystal:
  """An orthorhombic cell with one side of 8.6 Å: along it an atom and its image are both inside
  the 10 Å cube only within 1.4 Å of a face, so the atoms never show that translation."""
  return crystals.Crystal(id="long", lattice=np.diag([3.6, 4.1, 8.6]),
                          frac_coords=np.array([[0.0, 0.0, 0.1], [0.5, 0.5, 0.35],
                                                [0.5, 0.0, 0.6], [0.0, 0.5, 0.8]]),
                          atomic_numbers=np.array([26, 8, 8, 14]))


def test_a_cell_side_the_cube_cannot_repeat_takes_the_lattice_given():
  crystal = _long_cell()
  grids = voxelize_crystals([crystal], "repeat")
  atoms = segmentation.segment(grids["species"][0], SPEC.box)
  assert reconstruction.reconstruct_repeat(atoms, SPEC.box).reason == reconstruction.NO_LATTICE
  # The true lattice (the oracle's lattice head) and a head's estimate off by up to 0.4 Å: the
  # two short vectors snap to the translations the atoms show, the long one is kept.
  error = np.array([[0.3, -0.2, 0.1], [0.2, 0.25, -0.1], [0.1, -0.1, 0.2]])
  for lattice in (crystal.lattice, crystal.lattice + error):
    rebuilt = reconstruction.reconstruct_repeat(atoms, SPEC.box, lattice=lattice)
    assert matches(rebuilt, crystal), np.round(lattice, 2).tolist()
    a, b, c = sorted(rebuilt.structure.lattice.abc)
    np.testing.assert_allclose([a, b], [3.6, 4.1], atol=0.05)  # read off the atoms
    np.testing.assert_allclose(c, np.linalg.norm(lattice[2]), atol=1e-6)  # the one given


def test_a_lattice_the_atoms_contradict_is_refused():
  crystal = _long_cell()
  atoms = segmentation.segment(voxelize_crystals([crystal], "repeat")["species"][0], SPEC.box)
  # 5.0 Å along x (1.4 Å from any translation the atoms show) maps every atom onto nothing.
  wrong = np.diag([5.0, 4.1, 8.6])
  rebuilt = reconstruction.reconstruct_repeat(atoms, SPEC.box, lattice=wrong)
  assert rebuilt.reason == reconstruction.NO_LATTICE and "lattice given" in rebuilt.detail
  # A lattice the atoms show is read off them when the one given has about its volume.
  cubic = crystals.Crystal(id="cubic", lattice=4.0 * np.eye(3), frac_coords=np.zeros((1, 3)),
                           atomic_numbers=np.array([29]))
  atoms = segmentation.segment(voxelize_crystals([cubic], "repeat")["species"][0], SPEC.box)
  rebuilt = reconstruction.reconstruct_repeat(atoms, SPEC.box, lattice=np.diag([4.3, 3.8, 4.4]))
  np.testing.assert_allclose(rebuilt.structure.lattice.abc, [4.0] * 3, atol=0.05)


def test_a_pseudo_translation_gives_way_to_the_lattice_given():
  """c = 9 Å with the second Cu and O 0.09 Å away from c/2 apart: the atoms in the cube show
  c/2 as a translation (within the 0.3 Å tolerance), a cell of half the volume; the lattice given
  (volume twice that) holds on the atoms and is taken."""
  crystal = crystals.Crystal(id="pseudo", lattice=np.diag([4.0, 4.0, 9.0]),
                             frac_coords=np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.51],
                                                   [0.5, 0.5, 0.25], [0.5, 0.5, 0.76]]),
                             atomic_numbers=np.array([29, 29, 8, 8]))
  atoms = segmentation.segment(voxelize_crystals([crystal], "repeat")["species"][0], SPEC.box)
  pseudo = reconstruction.reconstruct_repeat(atoms, SPEC.box)
  assert pseudo.valid and len(pseudo.structure) == 2
  np.testing.assert_allclose(sorted(pseudo.structure.lattice.abc), [4.0, 4.0, 4.59], atol=0.05)
  rebuilt = reconstruction.reconstruct_repeat(atoms, SPEC.box, lattice=crystal.lattice)
  assert rebuilt.valid and len(rebuilt.structure) == 4
  np.testing.assert_allclose(sorted(rebuilt.structure.lattice.abc), [4.0, 4.0, 9.0], atol=0.05)
  np.testing.assert_array_equal(sorted(rebuilt.structure.atomic_numbers), [8, 8, 29, 29])
