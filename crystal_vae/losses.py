"""Per-example segmentation losses of the species heads (`models.SPECIES_HEADS`).

Atom voxels (species > 0) are a few percent of a cube, so an unweighted per-voxel loss is
minimised early by predicting "no atom" everywhere; `balanced` averages the loss over atom and
over empty voxels separately and weighs the two means equally.

`site_z_error` reads the density error as the error in Z it implies at each atom (the error
projected on one atom's Gaussian): the voxel MSE hardly sees a species one unit of Z off.

`lattice_mse` scores a lattice head against every basis of the true lattice whose vectors are
sums and differences of the true ones: a cubic perovskite's five atoms look the same with its
axes permuted, so the density cannot say which edge is `a`, and a plain MSE to one basis is
minimised by the average of the six, a collapsed cell.
"""

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crystal_vae import models


def _per_example(values: jax.Array, where: jax.Array) -> jax.Array:
  """Mean of `values` over the voxels where `where` holds, per example (0 where none do)."""
  axes = tuple(range(1, values.ndim))
  where = where.astype(values.dtype)
  return jnp.sum(values * where, axis=axes) / jnp.maximum(jnp.sum(where, axis=axes), 1.0)


def voxel_mean(values: jax.Array, atoms: jax.Array, balanced: bool) -> jax.Array:
  """Per-example mean of a per-voxel loss: over all voxels, or (balanced) the average of its
  mean over atom voxels and its mean over empty voxels."""
  if not balanced:
    return jnp.mean(values, axis=tuple(range(1, values.ndim)))
  return 0.5 * (_per_example(values, atoms) + _per_example(values, ~atoms))


def class_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy of `logits` (..., C) against integer `labels` (...), as
  optax.softmax_cross_entropy_with_integer_labels, its maximum shared with the species grid's
  argmax (`models.class_max`)."""
  top = models.class_max(logits)[0]
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)) - label_logits


def species_loss(outputs: jax.Array, species: jax.Array, *, species_head: str, balanced: bool,
                 z_weight: float) -> jax.Array:
  """Per-example loss of segmentation `outputs` (B, G, G, G, C) against species (B, G, G, G).

  "classes": softmax cross-entropy over 0..max_z.
  "mask_z": binary cross-entropy of the atom logit against species > 0, plus `z_weight` times
  the squared error of the Z / `models.Z_SCALE` regression over the atom voxels.
  """
  atoms = species > 0
  if species_head == "classes":
    return voxel_mean(class_cross_entropy(outputs, species), atoms, balanced)
  if species_head != "mask_z":
    raise ValueError(f"species head {species_head!r} not in {models.SPECIES_HEADS}")
  mask = optax.sigmoid_binary_cross_entropy(outputs[..., 0], atoms.astype(outputs.dtype))
  z_error = (outputs[..., 1] - species.astype(outputs.dtype) / models.Z_SCALE) ** 2
  return voxel_mean(mask, atoms, balanced) + z_weight * _per_example(z_error, atoms)


def composition_fractions(atomic_numbers: jax.Array, atom_mask: jax.Array, num_classes: int
                          ) -> jax.Array:
  """(B, A) padded atomic numbers -> (B, num_classes): the fraction of each cell's atoms per Z."""
  counts = jnp.sum(jax.nn.one_hot(atomic_numbers, num_classes) * atom_mask[..., None], axis=1)
  return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def composition_cross_entropy(logits: jax.Array, atomic_numbers: jax.Array, atom_mask: jax.Array
                              ) -> jax.Array:
  """Per-example cross-entropy of the composition head's softmax against the true fractions."""
  target = composition_fractions(atomic_numbers, atom_mask, logits.shape[-1])
  return optax.softmax_cross_entropy(logits, target)


def site_z_error(recon: jax.Array, density: jax.Array, *, box: float, sigma: float
                 ) -> jax.Array:
  """Per voxel (B, G, G, G): the Z error that `recon - density` implies for an atom there.

  The error is projected on the normalised Gaussian of an atom centred at the voxel and divided
  by that Gaussian's projection on itself, so an atom at a voxel centre, away from the cube's
  faces, whose decoded Z is off by ΔZ (and nothing else wrong) gives exactly ΔZ at its voxel.
  The voxel MSE of a one-unit error is ~2e-5 per atom: this is the scale species are read at.
  Separable: one (G, G) Gaussian matrix per axis.
  """
  grid = density.shape[-1]
  centres = (np.arange(grid) + 0.5) * box / grid
  gaussian = np.exp(-(centres[:, None] - centres[None, :]) ** 2 / (2.0 * sigma ** 2))
  offsets = np.arange(-grid, grid + 1) * box / grid
  self_overlap = np.sum(np.exp(-offsets ** 2 / sigma ** 2)) ** 3 / (
      sigma ** 3 * (2.0 * math.pi) ** 1.5)
  kernel = jnp.asarray(gaussian / self_overlap ** (1.0 / 3.0), jnp.float32)
  return jnp.einsum("bxyz,xi,yj,zk->bijk", recon - density, kernel, kernel, kernel,
                    precision=jax.lax.Precision.HIGHEST)


def site_z_loss(z_error: jax.Array, species: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per example: the mean squared Z error over the atom voxels (species > 0), and the
  fraction of atom voxels whose Z error is below 0.5 (the species would round right)."""
  atoms = species > 0
  right = (jnp.abs(z_error) < 0.5).astype(z_error.dtype)
  return _per_example(z_error ** 2, atoms), _per_example(right, atoms)


def composition_exact(logits: jax.Array, atomic_numbers: jax.Array, atom_mask: jax.Array
                      ) -> jax.Array:
  """Per example: whether n times every predicted fraction is within 0.5 of the true count (n
  atoms), i.e. the head's composition rounds to the true one."""
  target = composition_fractions(atomic_numbers, atom_mask, logits.shape[-1])
  num_atoms = jnp.sum(atom_mask, axis=-1, keepdims=True)
  return jnp.all(jnp.abs(jax.nn.softmax(logits) - target) * num_atoms < 0.5, axis=-1)


def _basis_changes() -> np.ndarray:
  """The 6,960 integer matrices U with entries in {-1, 0, 1} and det ±1: the rows of U @ L span
  the same lattice as those of L."""
  matrices = np.array(list(itertools.product((-1, 0, 1), repeat=9)), np.float32).reshape(-1, 3, 3)
  return matrices[np.abs(np.round(np.linalg.det(matrices))) == 1]


BASIS_CHANGES = _basis_changes()


def lattice_mse(predicted: jax.Array, target: jax.Array, box: float) -> jax.Array:
  """Per example (B,): the MSE (÷ box²) of the predicted lattice rows (B, 3, 3) against the
  nearest basis U @ target of the same lattice (U in `BASIS_CHANGES`)."""
  candidates = jnp.einsum("uij,bjk->buik", BASIS_CHANGES, target)
  errors = jnp.mean(((predicted[:, None] - candidates) / box) ** 2, axis=(-2, -1))
  return jnp.min(errors, axis=1)


def property_mse(predicted: jax.Array, target: jax.Array, stds: Sequence[float]) -> jax.Array:
  """Per example (B,): the mean over the properties it has a value of (target finite) of the
  squared error divided by the property's standard deviation squared; 0 without any value."""
  known = jnp.isfinite(target)
  error = jnp.where(known, (predicted - jnp.where(known, target, 0.0))
                    / jnp.asarray(stds, jnp.float32), 0.0)
  return jnp.sum(error ** 2, axis=-1) / jnp.maximum(jnp.sum(known, axis=-1), 1)
