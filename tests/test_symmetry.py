"""symmetry.symmetrize against hand-built crystals: a perturbed cubic perovskite comes back as the
ideal one in its own frame; a crystal without symmetry, or a too-tight tolerance, is untouched."""

import numpy as np
import pytest
import spglib
from scipy.spatial.transform import Rotation

from crystal_vae import symmetry

# SrTiO3, Pm-3m: Sr at the corner, Ti at the body centre, O at the face centres.
PEROVSKITE_SPECIES = np.array([38, 22, 8, 8, 8])
PEROVSKITE_FRAC = np.array([[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])


def _perturbed_perovskite(seed: int, site_noise: float = 0.15, cell_noise: float = 0.05):
  """An SrTiO3 cell (a = 3.9 Å) rotated into a random frame, its origin shifted, its rows and
  sites moved by up to ~`cell_noise` / `site_noise` Å."""
  rng = np.random.default_rng(seed)
  rotation = Rotation.random(random_state=seed).as_matrix()
  lattice = (3.9 * np.eye(3) + rng.uniform(-cell_noise, cell_noise, (3, 3))) @ rotation.T
  origin = rng.uniform(0, 1, 3)
  frac = PEROVSKITE_FRAC + origin + rng.uniform(-site_noise, site_noise, (5, 3)) / 3.9
  return lattice, np.mod(frac, 1.0), origin


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_perturbed_perovskite_becomes_the_ideal_one_in_its_frame(seed):
  lattice, frac, origin = _perturbed_perovskite(seed)
  assert spglib.get_symmetry_dataset((lattice, frac, PEROVSKITE_SPECIES),
                                     symprec=1e-3).number == 1
  new_lattice, new_frac = symmetry.symmetrize(lattice, PEROVSKITE_SPECIES, frac, symprec=0.8)

  dataset = spglib.get_symmetry_dataset((new_lattice, new_frac, PEROVSKITE_SPECIES), symprec=1e-5)
  assert dataset.number == 221  # Pm-3m, exactly
  # A cube: equal rows at right angles; the volume and orientation of the old cell nearly kept.
  metric = new_lattice @ new_lattice.T
  np.testing.assert_allclose(metric, metric[0, 0] * np.eye(3), atol=1e-9)
  assert abs(np.linalg.det(new_lattice) / np.linalg.det(lattice) - 1) < 0.05
  assert np.abs(new_lattice - lattice).max() < 0.15
  # Every site where the ideal perovskite has it, relative to the Sr site (the new origin).
  relative = new_frac - new_frac[0]
  relative -= np.floor(relative + 1e-9)
  np.testing.assert_allclose(relative, PEROVSKITE_FRAC, atol=1e-9)
  # ... and the crystal stays where it was: each site within the noise (<= 0.26 Å) of where the
  # unperturbed crystal has it.
  shift = new_frac - (PEROVSKITE_FRAC + origin)
  shift -= np.round(shift)
  assert np.linalg.norm(shift @ new_lattice, axis=1).max() < 0.26


def test_the_sites_move_by_the_mean_of_their_images():
  """Hand case: a CsCl-like cubic cell (a = 4 Å) with its body-centre atom 0.1 Å off along x;
  m-3m averages the displacement (+0.1, 0, 0) with its mirror (-0.1, 0, 0): the atom returns to
  the centre of the cube around the corner atom."""
  lattice = 4.0 * np.eye(3)
  species = np.array([55, 17])
  frac = np.array([[0, 0, 0], [0.5 + 0.1 / 4, 0.5, 0.5]])
  new_lattice, new_frac = symmetry.symmetrize(lattice, species, frac, symprec=0.3)
  np.testing.assert_allclose(new_lattice, lattice, atol=1e-12)
  relative = np.mod(new_frac[1] - new_frac[0], 1.0)
  np.testing.assert_allclose(relative, [0.5, 0.5, 0.5], atol=1e-12)


def test_a_crystal_without_symmetry_or_a_tight_tolerance_is_untouched():
  rng = np.random.default_rng(3)
  lattice = np.array([[4.1, 0.3, 0.2], [0.1, 5.2, 0.4], [0.3, 0.2, 6.3]])
  frac = rng.uniform(0, 1, (4, 3))
  species = np.array([8, 14, 26, 30])
  new_lattice, new_frac = symmetry.symmetrize(lattice, species, frac, symprec=0.1)
  np.testing.assert_array_equal(new_lattice, lattice)
  np.testing.assert_array_equal(new_frac, frac)

  perovskite, noisy, _ = _perturbed_perovskite(4)
  for tight in (1e-3, 0.0):  # 0: off
    new_lattice, new_frac = symmetry.symmetrize(perovskite, PEROVSKITE_SPECIES, noisy, tight)
    np.testing.assert_array_equal(new_frac, noisy)
    np.testing.assert_array_equal(new_lattice, perovskite)


def test_a_skewed_basis_of_the_same_crystal_is_symmetrised_too():
  """The perturbed perovskite in a skewed basis of the same lattice (interplanar spacings down to
  0.45 Å): an operation's nearest image then lies beyond the rounded cell, and is still found."""
  lattice, frac, _ = _perturbed_perovskite(5)
  skew = np.array([[1, 0, 0], [3, 1, 0], [2, -2, 1]])
  skewed_lattice = skew @ lattice
  skewed_frac = np.mod(frac @ np.linalg.inv(skew), 1.0)  # the same cartesian sites
  new_lattice, new_frac = symmetry.symmetrize(skewed_lattice, PEROVSKITE_SPECIES, skewed_frac,
                                              symprec=0.8)
  assert spglib.get_symmetry_dataset((new_lattice, new_frac, PEROVSKITE_SPECIES),
                                     symprec=1e-5).number == 221


@pytest.mark.parametrize("old_error_handling", [True, False])
def test_atoms_on_top_of_each_other_are_left_as_they_are(monkeypatch, old_error_handling):
  """spglib finds no symmetry for two atoms at one place: it returns None, or raises with its new
  error handling (spglib 3's default); either way the crystal comes back unchanged."""
  monkeypatch.setattr(spglib.error, "OLD_ERROR_HANDLING", old_error_handling)
  frac = np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
  lattice, same = symmetry.symmetrize(3.9 * np.eye(3), np.array([8, 8]), frac, symprec=0.5)
  np.testing.assert_array_equal(same, frac)
  np.testing.assert_array_equal(lattice, 3.9 * np.eye(3))
