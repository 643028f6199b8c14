"""A repeat cube's crystal from its density alone: lattice, sites and Z by least squares."""

import numpy as np
from pymatgen.core import Lattice, Structure
import pytest

from crystal_vae import crystals, density_fit, inference, reconstruction
from crystal_vae.configs import recipes
from crystal_vae import species_choice
from crystal_vae import voxelize
from conftest import (MATCHER, SPEC, assert_same_atoms, matches, representative_prototypes,
                      unit_cell_positions, voxelize_crystals)


def _fit(density: np.ndarray) -> density_fit.DensityFit:
  return density_fit.DensityFit(density, SPEC.box, SPEC.sigma, SPEC.cutoff)


def _perovskite(a: float = 3.9) -> crystals.Crystal:
  """Cubic SrTiO3: Sr at the corner, Ti at the body centre, O at the face centres."""
  return crystals.Crystal("SrTiO3", np.eye(3) * a,
                          np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                    [0, 0.5, 0.5]]), np.array([38, 22, 8, 8, 8]))


def test_translation_difference_matches_a_direct_sum():
  rng = np.random.default_rng(0)
  density = rng.random((6, 6, 6))
  difference, overlap = density_fit.translation_difference(density)
  for shift in [(1, 0, 0), (2, -1, 3), (-3, 2, -2)]:
    a = density[max(0, -shift[0]):6 - max(0, shift[0]), max(0, -shift[1]):6 - max(0, shift[1]),
                max(0, -shift[2]):6 - max(0, shift[2])]
    b = density[max(0, shift[0]):6 + min(0, shift[0]), max(0, shift[1]):6 + min(0, shift[1]),
                max(0, shift[2]):6 + min(0, shift[2])]
    index = tuple(s % 12 for s in shift)
    assert overlap[index] == a.size
    np.testing.assert_allclose(difference[index], ((a - b) ** 2).sum() / (a ** 2 + b ** 2).sum(),
                               rtol=1e-6)


def test_lattice_of_a_perovskite_skips_the_body_centre_pseudo_translation():
  """Shifting SrTiO3 by (½, ½, ½)a swaps Sr and Ti: a shallow minimum that must not be taken."""
  crystal = _perovskite()
  grids = voxelize_crystals([crystal], voxelize.REPEAT, random_offset=True, seed=3)
  basis = density_fit.lattice_from_density(grids["density"][0], SPEC.box)
  assert basis is not None and np.linalg.det(basis) > 0
  np.testing.assert_allclose(sorted(np.linalg.norm(basis, axis=1)), [3.9] * 3, atol=0.02)
  np.testing.assert_allclose(abs(np.linalg.det(basis)), 3.9 ** 3, rtol=0.02)


def test_sites_include_the_oxygen_saddles_between_cations():
  """O between two Ti is a saddle of the density, not a peak: it is found in the residual."""
  crystal = _perovskite()
  grids = voxelize_crystals([crystal], voxelize.REPEAT, seed=4)
  fit = _fit(grids["density"][0])
  z, frac, basis = density_fit.find_sites(fit, np.eye(3) * 3.9, min_z=0.5)
  assert sorted(np.rint(z).astype(int).tolist()) == [8, 8, 8, 22, 38]
  np.testing.assert_allclose(z, np.rint(z), atol=0.05)
  np.testing.assert_allclose(basis, np.eye(3) * 3.9, atol=1e-3)


@pytest.mark.slow
def test_prototypes_are_rebuilt_from_their_density_alone():
  """12 lattice systems and sizes. Known misses: corundum's pseudo-translations (as deep as its
  lattice vectors at 30³) and CaC6's C rings (C 1.44 Å apart, unresolved peaks)."""
  cells = representative_prototypes()
  grids = voxelize_crystals(cells, voxelize.REPEAT, random_offset=True, seed=2)
  failures = []
  for cell, density in zip(cells, grids["density"]):
    result = reconstruction.reconstruct_repeat_from_density(_fit(density), max_z=100, min_z=0.5)
    if not (matches(result, cell)
            and np.allclose(sorted(result.structure.lattice.get_niggli_reduced_lattice().abc),
                            sorted(Lattice(cell.lattice).get_niggli_reduced_lattice().abc),
                            atol=0.01)):
      failures.append((cell.id, result.reason, result.detail))
  assert len(failures) <= 2, failures


def test_noise_sites_below_min_z_are_dropped_and_an_empty_cube_has_no_atoms():
  crystal = _perovskite()
  grids = voxelize_crystals([crystal], voxelize.REPEAT, seed=5)
  density = grids["density"][0]
  rng = np.random.default_rng(1)
  noisy = density + 0.05 * rng.standard_normal(density.shape)
  result = reconstruction.reconstruct_repeat_from_density(_fit(noisy), max_z=100, min_z=6)
  assert result.valid and sorted(s.Z for s in result.structure.species) == [8, 8, 8, 22, 38]
  empty = reconstruction.reconstruct_repeat_from_density(_fit(np.zeros_like(density)), max_z=100,
                                                         min_z=0.5)
  assert not empty.valid and empty.reason == reconstruction.NO_ATOMS


def test_images_in_cube_of_a_cubic_lattice():
  """a = 4 Å in a 10 Å cube: images at 0, 4, 8 Å per axis; those at 0 lie on a face."""
  atoms = density_fit.images_in_cube(np.array([26]), np.zeros((1, 3)), np.eye(3) * 4.0, 10.0)
  assert len(atoms) == 27 and set(atoms.species.tolist()) == {26}
  assert sorted(set(atoms.positions[:, 0].round(6).tolist())) == [0.0, 4.0, 8.0]
  np.testing.assert_array_equal(atoms.on_boundary, np.any(atoms.positions == 0.0, axis=1))


def test_a_predicted_composition_corrects_the_species_of_a_biased_density():
  """The decoder's bias: heavy peaks too low, anions too high (Sr 38 -> 36, O 8 -> 10). Rounded
  fitted Z give Kr Ti Ne3; with the composition Sr Ti O3 each site takes its most probable
  element (Kr and Ne, at the floor fraction 1e-6, lose to Sr and O two units away)."""
  crystal = _perovskite()
  biased = crystals.Crystal("biased", crystal.lattice, crystal.frac_coords,
                            np.array([36, 22, 10, 10, 10]))
  density = voxelize_crystals([biased], voxelize.REPEAT, random_offset=True, seed=3)["density"][0]
  rounded = reconstruction.reconstruct_repeat_from_density(_fit(density), max_z=100, min_z=6)
  assert sorted(s.Z for s in rounded.structure.species) == [10, 10, 10, 22, 36]
  composition = np.zeros(101)
  composition[[38, 22, 8]] = [0.2, 0.2, 0.6]
  result = reconstruction.reconstruct_repeat_from_density(_fit(density), max_z=100, min_z=6,
                                                          composition=composition,
                                                          site_z_sigma=1.5)
  assert matches(result, crystal)
  assert set(result.cube_atoms.species.tolist()) == {8, 22, 38}


def test_atom_count_is_the_density_electrons_over_the_composition_mean_z():
  """Sr Ti O3: mean Z (38 + 22 + 3 * 8) / 5 = 16.8; the "no atom" fraction does not count."""
  composition = np.zeros(101)
  composition[[0, 38, 22, 8]] = [0.5, 0.1, 0.1, 0.3]
  assert species_choice.atom_count(np.array([38, 22, 8, 8, 8, 4.0]), composition) == 5  # 5.24
  assert species_choice.atom_count(np.array([38, 22, 8, 8, 8, 8, 8.0]), composition) == 6  # 5.95
  assert species_choice.atom_count(np.array([38, 4.0]), composition) is None  # 2.50
  assert species_choice.atom_count(np.array([38, 22, 8.0]), np.eye(101)[0]) is None


def test_light_atoms_missing_counts_the_compositions_light_atoms_per_heavy_site():
  """Ba Li F3 (Li on the B site): light fraction f = 0.2 (Z <= 4), f / (1 - f) = 0.25 light
  atoms per other atom."""
  composition = np.zeros(101)
  composition[[0, 56, 3, 9]] = [0.5, 0.1, 0.1, 0.3]
  missing = lambda site_z: species_choice.light_atoms_missing(np.array(site_z), composition, 4.0)
  assert missing([56, 9, 9, 9.0]) == 1  # 0.25 * 4 heavy sites
  assert missing([56, 9, 9, 9, 3.5]) == 0  # the light site was found (below 4 + 2)
  assert missing([56, 9.0]) == 0  # 0.5 rounds to 0
  assert missing([56, 9, 9, 9, 56, 9, 9, 9.0]) == 2  # two formula units
  assert species_choice.light_atoms_missing(np.array([56, 9.0]), np.eye(101)[9], 4.0) == 0


@pytest.mark.slow
def test_a_light_atom_below_the_bar_is_added_when_the_composition_asks_for_it():
  """Inverse perovskite Ba Li F3 (a = 3.95 Å): Li (Z 3) is below min Z 4 and left out of the
  density's sites; with the composition Ba Li F3 the residual's highest peak beside the four
  sites is the Li, added back, and the crystal is Ba Li F3 again."""
  crystal = crystals.Crystal("BaLiF3", np.eye(3) * 3.95,
                             np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                       [0, 0.5, 0.5]]), np.array([56, 3, 9, 9, 9]))
  density = voxelize_crystals([crystal], voxelize.REPEAT, seed=2)["density"][0]
  alone = reconstruction.reconstruct_repeat_from_density(_fit(density), max_z=100, min_z=4)
  assert len(alone.structure) == 4 and 3 not in [s.Z for s in alone.structure.species]
  composition = np.zeros(101)
  composition[[56, 3, 9]] = [0.2, 0.2, 0.6]
  result = reconstruction.reconstruct_repeat_from_density(_fit(density), max_z=100, min_z=4,
                                                          composition=composition,
                                                          site_z_sigma=2.0)
  assert sorted(s.Z for s in result.structure.species) == [3, 9, 9, 9, 56]
  assert MATCHER.fit(result.structure, crystal.to_structure())


@pytest.mark.slow
def test_a_spurious_site_beyond_the_compositions_atom_count_is_dropped():
  """Rock salt (conventional cell, a = 5.64 Å) with a light spurious site, Be in one tetrahedral
  hole (2.44 Å from Na and Cl): read with min Z 3 the density has 9 sites; with the composition
  NaCl the density's 116 electrons are 8.29 atoms of mean Z 14, so the weakest site goes and
  the crystal is rock salt again."""
  a = 5.64
  fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
  salt = crystals.Crystal("NaCl", np.eye(3) * a, np.vstack([fcc, fcc + [0.5, 0, 0]]),
                          np.array([11] * 4 + [17] * 4))
  spurious = crystals.Crystal("spurious", salt.lattice,
                              np.vstack([salt.frac_coords, [0.25, 0.25, 0.25]]),
                              np.append(salt.atomic_numbers, 4))
  density = voxelize_crystals([spurious], voxelize.REPEAT, seed=6)["density"][0]
  alone = reconstruction.reconstruct_repeat_from_density(_fit(density), max_z=100, min_z=3)
  assert sorted(s.Z for s in alone.structure.species) == [4] + [11] * 4 + [17] * 4
  composition = np.zeros(101)
  composition[[11, 17]] = [0.5, 0.5]
  result = reconstruction.reconstruct_repeat_from_density(_fit(density), max_z=100, min_z=3,
                                                          composition=composition,
                                                          site_z_sigma=1.5)
  # The conventional cell (the Be broke the fcc translations), as rock salt.
  assert sorted(s.Z for s in result.structure.species) == [11] * 4 + [17] * 4
  assert MATCHER.fit(result.structure, salt.to_structure())
  np.testing.assert_allclose(result.structure.lattice.abc, [a] * 3, atol=0.01)
  assert set(result.cube_atoms.species.tolist()) == {11, 17}


def test_eval_species_from_composition_switches_the_composition_head_off():
  """The same biased density and predicted composition through `TrainedModel.to_crystals`: with
  `eval.species_from_composition` (default) the composition names the elements; off, the fitted
  Z alone do (a composition head that has not learned must not overrule the density)."""
  crystal = _perovskite()
  biased = crystals.Crystal("biased", crystal.lattice, crystal.frac_coords,
                            np.array([36, 22, 10, 10, 10]))
  density = voxelize_crystals([biased], voxelize.REPEAT, random_offset=True, seed=3)["density"]
  composition = np.zeros((1, 101))
  composition[0, [38, 22, 8]] = [0.2, 0.2, 0.6]
  config = recipes.get_config("repeat", "cpu")
  config.model.composition_head = True
  species = {}
  for use in (True, False):
    config.eval.species_from_composition = use
    model = inference.TrainedModel(config, variables=None)
    [result] = model.to_crystals({"density": density, "composition": composition})
    species[use] = sorted(s.Z for s in result.structure.species)
  assert species[True] == [8, 8, 8, 22, 38]
  assert species[False] == [10, 10, 10, 22, 36]


def test_symmetrised_sites_return_to_the_ideal_perovskite():
  """SrTiO3 voxelised with each O 0.22-0.27 Å off its face centre (in different directions): the
  fit puts the O there; symmetrised within 0.8 Å (`symprec`), every image in the cube lies within
  0.02 Å of the ideal perovskite's (atoms away from the faces, both ways), its lattice cubic."""
  ideal = _perovskite()
  distorted_frac = ideal.frac_coords + np.array(
      [[0, 0, 0], [0, 0, 0], [0.25, 0, 0], [0, 0.25, -0.1], [0.1, -0.2, 0.0]]) / 3.9
  distorted = crystals.Crystal("distorted", ideal.lattice, distorted_frac, ideal.atomic_numbers)
  density = voxelize_crystals([distorted], voxelize.REPEAT, seed=5)["density"][0]
  truth = density_fit.images_in_cube(ideal.atomic_numbers, ideal.frac_coords, ideal.lattice,
                                     SPEC.box)

  def worst_distance(result):  # both ways, over the atoms away from the cube's faces
    assert result.valid, result.detail
    rebuilt = result.cube_atoms
    distances = np.linalg.norm(rebuilt.positions[:, None] - truth.positions[None], axis=-1)
    return max(distances.min(axis=1)[~rebuilt.on_boundary].max(),
               distances.min(axis=0)[~truth.on_boundary].max())

  as_fitted = reconstruction.reconstruct_repeat_from_density(_fit(density), max_z=100, min_z=6)
  assert worst_distance(as_fitted) > 0.15
  symmetric = reconstruction.reconstruct_repeat_from_density(_fit(density), max_z=100, min_z=6,
                                                             symprec=0.8)
  assert worst_distance(symmetric) < 0.02
  lattice = symmetric.structure.lattice
  np.testing.assert_allclose(lattice.angles, [90] * 3, atol=1e-6)
  np.testing.assert_allclose(lattice.abc, [lattice.a] * 3, atol=1e-9)


# A unit-cell cube: one cell, no periodic images.


def _strontium_titanate(a: float = 3.905) -> crystals.Crystal:
  """Cubic SrTiO3: Sr at the corner, Ti at the centre, O at the face centres."""
  structure = Structure(Lattice.cubic(a), ["Sr", "Ti", "O", "O", "O"],
                        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
  return crystals.crystal_from_structure(structure, "srtio3")


def test_atoms_read_off_the_density_of_a_unit_cell_are_its_atoms():
  """No segmentation: SrTiO3's O (Z 8) sits 1.95 Å from Ti (Z 22), a saddle of the density that
  becomes a peak of the residual once Sr and Ti are fitted."""
  crystal = _strontium_titanate()
  grids = voxelize_crystals([crystal], voxelize.UNIT_CELL)
  atoms = density_fit.atoms_from_density(grids["density"][0], SPEC.box, SPEC.sigma, max_z=100)
  true_positions = unit_cell_positions(crystal)
  assert_same_atoms(atoms, crystal.atomic_numbers, true_positions)
  distance = np.linalg.norm(atoms.positions[:, None] - true_positions[None], axis=-1).min(1)
  assert distance.max() < 0.01  # Å


def test_atoms_read_off_a_noisy_density_keep_count_and_species():
  """Gaussian noise of voxel MSE 1e-4 (the `gpu` unit-cell model's validation MSE is 2.7e-4)."""
  crystal = _strontium_titanate()
  density = voxelize_crystals([crystal], voxelize.UNIT_CELL)["density"][0]
  noisy = density + np.random.default_rng(0).normal(0.0, 0.01, density.shape)
  atoms = density_fit.atoms_from_density(noisy, SPEC.box, SPEC.sigma, max_z=100, min_z=3.0)
  assert sorted(atoms.species.tolist()) == sorted(crystal.atomic_numbers.tolist())
  distance = np.linalg.norm(atoms.positions[:, None] - unit_cell_positions(crystal)[None],
                            axis=-1).min(1)
  assert distance.max() < 0.1  # Å


def test_atoms_read_off_an_empty_cube_are_none():
  atoms = density_fit.atoms_from_density(np.zeros((30, 30, 30)), SPEC.box, SPEC.sigma, 100)
  assert len(atoms) == 0 and atoms.positions.shape == (0, 3)


def test_atoms_from_density_stops_when_a_round_adds_no_atom(monkeypatch):
  """Seven atoms in a 4 Å cube, some closer than the fit resolves (noise σ 0.02): each round from
  the third adds a residual peak that the refit merges again. The fit stops there (it ran all 10
  rounds before, a minute per cube on decoded Materials Project cells) and still accounts for
  the cube's electrons."""
  rng = np.random.default_rng(29)
  count = rng.integers(2, 8)
  positions, z = rng.uniform(3, 7, (count, 3)), rng.integers(3, 40, count)
  axis = (np.arange(16) + 0.5) * 10.0 / 16
  points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
  density = sum(zz * np.exp(-((points - p) ** 2).sum(-1) / 2) / (2 * np.pi) ** 1.5
                for p, zz in zip(positions, z)) + rng.normal(0, 0.02, points.shape[:3])
  rounds = []
  maximum_filter = density_fit.ndimage.maximum_filter
  monkeypatch.setattr(density_fit.ndimage, "maximum_filter",
                      lambda *args, **kwargs: rounds.append(1) or maximum_filter(*args, **kwargs))
  atoms = density_fit.atoms_from_density(density, 10.0, 1.0, 100, min_z=3.0)
  assert len(rounds) <= 4
  assert 0 < len(atoms) <= count
  assert abs(atoms.species.sum() - z.sum()) <= 0.05 * z.sum()
