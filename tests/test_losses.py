"""Species-head losses and species grids against hand-computed values."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crystal_vae import losses
from crystal_vae import models
from crystal_vae.native import kernels


def _one_atom_voxel() -> np.ndarray:
  species = np.zeros((1, 2, 2, 2), np.int32)
  species[0, 0, 0, 0] = 3
  return species


def _softplus(x: float) -> float:
  return float(np.log1p(np.exp(x)))


@pytest.mark.parametrize("balanced", [False, True])
def test_classes_cross_entropy(balanced):
  species = _one_atom_voxel()
  logits = np.zeros((1, 2, 2, 2, 4), np.float32)
  logits[0, 0, 0, 0, 3] = np.log(3.0)  # p(3) = 3 / 6 at the atom voxel, else uniform 1/4.
  loss = losses.species_loss(jnp.asarray(logits), jnp.asarray(species), species_head="classes",
                             balanced=balanced, z_weight=0.0)
  atom, empty = -np.log(0.5), np.log(4.0)
  expected = 0.5 * (atom + empty) if balanced else (atom + 7 * empty) / 8
  np.testing.assert_allclose(loss, [expected], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("use_native", [True, False])
def test_class_cross_entropy_is_optax_with_its_gradient(use_native, monkeypatch):
  """losses.class_cross_entropy against optax's integer-label cross-entropy, values and logit
  gradients, with a -inf logit (masked class) and large logits."""
  if not use_native:
    monkeypatch.setattr(kernels, "available", lambda: False)
  elif kernels._compiler() is None:  # pylint: disable=protected-access
    pytest.skip("no C++ compiler")
  logits = np.array(jax.random.normal(jax.random.key(0), (2, 3, 4, 5, 101))) * 5.0
  logits[0, 0, 0, 0, 7] = -np.inf
  logits[1, 2, 3, 4, :] += 80.0
  labels = jax.random.randint(jax.random.key(1), (2, 3, 4, 5), 0, 101)
  loss = lambda ce: lambda x: jnp.sum(jnp.cos(ce(x, labels)))
  reference = optax.softmax_cross_entropy_with_integer_labels
  np.testing.assert_allclose(jax.jit(losses.class_cross_entropy)(jnp.asarray(logits), labels),
                             reference(jnp.asarray(logits), labels), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.grad(loss(losses.class_cross_entropy)))(logits),
                             jax.grad(loss(reference))(logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("balanced", [False, True])
def test_mask_z_loss(balanced):
  species = _one_atom_voxel()
  outputs = np.zeros((1, 2, 2, 2, 2), np.float32)
  outputs[..., 0] = -1.0  # atom logit: -1 everywhere ...
  outputs[0, 0, 0, 0, 0] = 2.0  # ... and 2 at the atom voxel
  outputs[0, 0, 0, 0, 1] = 0.5  # Z / 10 predicted 0.5 for Z = 3: error 0.2
  outputs[0, 1, 1, 1, 1] = 9.0  # a Z guess at an empty voxel costs nothing
  loss = losses.species_loss(jnp.asarray(outputs), jnp.asarray(species), species_head="mask_z",
                             balanced=balanced, z_weight=0.7)
  atom, empty = _softplus(-2.0), _softplus(-1.0)  # -log σ(2), -log(1 − σ(−1))
  mask = 0.5 * (atom + empty) if balanced else (atom + 7 * empty) / 8
  np.testing.assert_allclose(loss, [mask + 0.7 * 0.2 ** 2], rtol=1e-5)


def test_balanced_mean_of_a_cube_without_atoms_is_the_empty_mean():
  values = jnp.arange(8.0).reshape(1, 2, 2, 2)
  atoms = jnp.zeros((1, 2, 2, 2), bool)
  np.testing.assert_allclose(losses.voxel_mean(values, atoms, True), [0.5 * 3.5])


def test_species_grids_of_both_heads():
  logits = np.zeros((1, 2, 2, 2, 4))
  logits[0, 1, 1, 1, 3] = 1.0
  species = np.asarray(models.species_grid(logits, "classes", 3))
  assert species.shape == (1, 2, 2, 2) and species[0, 1, 1, 1] == 3 and species.sum() == 3
  outputs = np.zeros((3, 2))
  outputs[:, 0] = [1.0, -1.0, 0.5]  # atom, empty, atom
  outputs[:, 1] = [2.64, 2.64, 12.0]  # Z 26.4 -> 26; ignored; 120 -> clipped to max_z
  np.testing.assert_array_equal(models.species_grid(outputs, "mask_z", 100), [26, 0, 100])
  with pytest.raises(ValueError, match="species head"):
    models.species_grid(outputs, "ordinal", 100)


def test_composition_cross_entropy_and_exactness_by_hand():
  # Cell 0: Sr Ti O O O (Z 38, 22, 8) plus one padding row; cell 1: a single Fe atom.
  atomic_numbers = np.array([[38, 22, 8, 8, 8, 0], [26, 0, 0, 0, 0, 0]])
  atom_mask = np.array([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
  logits = np.zeros((2, 40), np.float32)
  logits[0, [38, 22, 8]] = np.log([1.0, 1.0, 3.0]) + 10.0  # exactly the cell's fractions
  logits[1, 26] = np.log(19.5)  # p(Fe) = 19.5 / (19.5 + 39 others) = 1 / 3
  fractions = np.asarray(losses.composition_fractions(atomic_numbers, atom_mask, 40))
  np.testing.assert_allclose(fractions[0, [38, 22, 8]], [0.2, 0.2, 0.6])
  assert fractions[0].sum() == pytest.approx(1.0) and fractions[1, 26] == 1.0
  ce = np.asarray(losses.composition_cross_entropy(jnp.asarray(logits), atomic_numbers, atom_mask))
  p = np.exp(10.0) * np.array([1.0, 1.0, 3.0]) / (np.exp(10.0) * 5.0 + 37.0)
  np.testing.assert_allclose(ce, [-(0.2 * np.log(p[0]) + 0.2 * np.log(p[1]) + 0.6 * np.log(p[2])),
                                  -np.log(1 / 3)], rtol=1e-5)
  # Cell 0 rounds to 1 Sr, 1 Ti, 3 O; cell 1: 1/3 of an Fe atom is not within 0.5 of 1 atom.
  exact = losses.composition_exact(jnp.asarray(logits), atomic_numbers, atom_mask)
  assert np.asarray(exact).tolist() == [True, False]


def _atom_density(grid: int, box: float, sigma: float, centre: np.ndarray, z: float) -> np.ndarray:
  """One atom's normalised Gaussian density on the voxel centres (numpy)."""
  centres = (np.arange(grid) + 0.5) * box / grid
  x, y, w = np.meshgrid(centres, centres, centres, indexing="ij")
  sq = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (w - centre[2]) ** 2
  return z * np.exp(-sq / (2 * sigma ** 2)) / (sigma ** 3 * (2 * np.pi) ** 1.5)


def test_site_z_error_of_one_atom_is_its_z_error():
  grid, box, sigma = 24, 8.0, 1.0
  h = box / grid
  centre = (np.array([12, 12, 12]) + 0.5) * h  # a voxel centre, 4 Å from every face
  true = _atom_density(grid, box, sigma, centre, 8.0)
  decoded = _atom_density(grid, box, sigma, centre, 11.0)  # Z 3 too high, position right
  error = np.asarray(losses.site_z_error(jnp.asarray(decoded[None]), jnp.asarray(true[None]),
                                         box=box, sigma=sigma))[0]
  np.testing.assert_allclose(error[12, 12, 12], 3.0, rtol=1e-4)
  # One voxel away the projection of a Gaussian on its neighbour: 3 exp(-h² / 4σ²).
  np.testing.assert_allclose(error[13, 12, 12], 3.0 * np.exp(-h ** 2 / (4 * sigma ** 2)),
                             rtol=1e-4)
  np.testing.assert_allclose(error[12, 11, 12], error[13, 12, 12], rtol=1e-5)


def test_site_z_error_against_a_numpy_loop():
  grid, box, sigma = 6, 3.0, 0.7
  rng = np.random.default_rng(0)
  difference = rng.normal(size=(grid, grid, grid)).astype(np.float32)
  error = np.asarray(losses.site_z_error(jnp.asarray(difference[None]),
                                         jnp.zeros((1,) + (grid,) * 3), box=box, sigma=sigma))[0]
  h = box / grid
  self_overlap = sum(np.exp(-(i * h) ** 2 / sigma ** 2) for i in range(-40, 41)) ** 3 / (
      sigma ** 3 * (2 * np.pi) ** 1.5)
  expected = np.zeros_like(error)
  for i, j, k in np.ndindex(grid, grid, grid):
    for a, b, c in np.ndindex(grid, grid, grid):
      sq = ((i - a) ** 2 + (j - b) ** 2 + (k - c) ** 2) * h ** 2
      expected[i, j, k] += difference[a, b, c] * np.exp(-sq / (2 * sigma ** 2))
  np.testing.assert_allclose(error, expected / self_overlap, rtol=1e-4, atol=1e-6)


def test_site_z_loss_by_hand():
  z_error = np.zeros((1, 2, 2, 2), np.float32)
  z_error[0, 0, 0, 0], z_error[0, 1, 1, 1], z_error[0, 0, 1, 0] = 0.3, -2.0, 50.0
  species = np.zeros((1, 2, 2, 2), np.int32)
  species[0, 0, 0, 0] = species[0, 1, 1, 1] = 8  # the error of 50 is at an empty voxel
  mse, right = losses.site_z_loss(jnp.asarray(z_error), jnp.asarray(species))
  np.testing.assert_allclose(mse, [(0.09 + 4.0) / 2], rtol=1e-6)
  np.testing.assert_allclose(right, [0.5], rtol=1e-6)


def _lattice_mse_loop(predicted: np.ndarray, target: np.ndarray, box: float) -> float:
  """The nearest basis of the same lattice, by a plain loop over integer matrices."""
  best = np.inf
  for entries in itertools.product((-1, 0, 1), repeat=9):
    change = np.array(entries, np.float64).reshape(3, 3)
    if abs(round(np.linalg.det(change))) == 1:
      best = min(best, np.mean(((predicted - change @ target) / box) ** 2))
  return best


def test_lattice_mse_does_not_tell_bases_of_one_lattice_apart():
  cubic = 4.1 * np.eye(3)
  hexagonal = np.array([[3.0, 0.0, 0.0], [-1.5, 1.5 * np.sqrt(3), 0.0], [0.0, 0.0, 5.0]])
  rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
  # The cubic axes permuted and one flipped; the hexagonal cell turned by 60° (a -> b, b -> b - a).
  swapped = np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]]) @ cubic @ rotation.T
  turned = np.array([[0, 1, 0], [-1, 1, 0], [0, 0, 1]]) @ hexagonal @ rotation.T
  predicted = np.stack([swapped, turned]).astype(np.float32)
  target = np.stack([cubic @ rotation.T, hexagonal @ rotation.T]).astype(np.float32)
  np.testing.assert_allclose(losses.lattice_mse(predicted, target, 10.0), 0.0, atol=1e-10)


def test_lattice_mse_against_a_numpy_loop():
  rng = np.random.default_rng(1)
  target = np.stack([4.0 * np.eye(3) + rng.normal(0, 0.3, (3, 3)) for _ in range(3)])
  # The collapsed answer of a plain MSE (the average of the permuted cubic bases) and two noisy ones.
  predicted = np.stack([np.full((3, 3), 4.0 / 3.0), target[1] + rng.normal(0, 0.5, (3, 3)),
                        rng.normal(0, 3.0, (3, 3))])
  got = losses.lattice_mse(predicted.astype(np.float32), target.astype(np.float32), 10.0)
  expected = [_lattice_mse_loop(p, t, 10.0) for p, t in zip(predicted, target)]
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  assert got[0] > 0.01  # a collapsed cell stays far from every basis
