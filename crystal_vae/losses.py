"""Per-example segmentation losses of the species heads (`models.SPECIES_HEADS`).

Atom voxels (species > 0) are a few percent of a cube, so an unweighted per-voxel loss is
minimised early by predicting "no atom" everywhere; `balanced` averages the loss over atom and
over empty voxels separately and weighs the two means equally.
"""

import jax
import jax.numpy as jnp
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


def species_loss(outputs: jax.Array, species: jax.Array, *, species_head: str, balanced: bool,
                 z_weight: float) -> jax.Array:
  """Per-example loss of segmentation `outputs` (B, G, G, G, C) against species (B, G, G, G).

  "classes": softmax cross-entropy over 0..max_z.
  "mask_z": binary cross-entropy of the atom logit against species > 0, plus `z_weight` times
  the squared error of the Z / `models.Z_SCALE` regression over the atom voxels.
  """
  atoms = species > 0
  if species_head == "classes":
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs, species)
    return voxel_mean(ce, atoms, balanced)
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



def composition_exact(logits: jax.Array, atomic_numbers: jax.Array, atom_mask: jax.Array
                      ) -> jax.Array:
  """Per example: whether n times every predicted fraction is within 0.5 of the true count (n
  atoms), i.e. the head's composition rounds to the true one."""
  target = composition_fractions(atomic_numbers, atom_mask, logits.shape[-1])
  num_atoms = jnp.sum(atom_mask, axis=-1, keepdims=True)
  return jnp.all(jnp.abs(jax.nn.softmax(logits) - target) * num_atoms < 0.5, axis=-1)
