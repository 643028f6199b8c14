"""Learning tests: the segmenter must learn to find atoms, so a collapse to "no atom
everywhere" (every earlier trained model) cannot come back unnoticed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crystal_vae import crystals
from crystal_vae import losses
from crystal_vae import models
from crystal_vae import voxelize
from conftest import prototypes

# 16^3 voxels over a 6 Å cube: 0.375 Å voxels, close to the paper's 0.33 Å.
SPEC = voxelize.GridSpec(grid=16, box=6.0)

pytestmark = pytest.mark.slow  # trains models end to end (minutes)


def _train_segmenter(species_head: str, balanced: bool, steps: int, seed: int = 0):
  """Trains a tiny attention U-Net on the TRUE densities of 16 unit-cell prototypes; returns
  (atom-voxel recall, empty-voxel accuracy) on those grids."""
  cells = [c for c in prototypes() if np.linalg.norm(c.lattice, axis=1).max() < 5.0][::4][:16]
  grids = voxelize.voxelize_batch(
      crystals.stack_crystals(cells),
      jax.random.key(0), spec=SPEC, representation=voxelize.UNIT_CELL, rotate=False,
      random_offset=False, num_images=(1, 1, 1))
  density, species = grids["density"], grids["species"]
  unet = models.AttentionUNet((4, 8), models.segmenter_channels(species_head, 100), "auto")
  variables = unet.init(jax.random.key(seed), density[:1], train=False)
  optimizer = optax.adam(1e-2)
  loss_of = functools.partial(losses.species_loss, species_head=species_head, balanced=balanced,
                              z_weight=0.1)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(params):
      outputs, updates = unet.apply({"params": params, "batch_stats": batch_stats}, density,
                                    train=True, mutable=["batch_stats"])
      return jnp.mean(loss_of(outputs, species)), updates["batch_stats"]
    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = optimizer.init(params)
  for _ in range(steps):
    params, batch_stats, opt_state = step(params, batch_stats, opt_state)
  outputs = unet.apply({"params": params, "batch_stats": batch_stats}, density, train=False)
  predicted = np.asarray(models.species_grid(outputs, species_head, 100))
  atoms = np.asarray(species) > 0
  return (predicted > 0)[atoms].mean(), (predicted == 0)[~atoms].mean()


def test_mask_head_learns_to_find_atoms_in_true_densities():
  recall, empty_accuracy = _train_segmenter("mask_z", balanced=True, steps=60)
  # Measured: 0.84 and 0.87 after 60 steps; the collapse to "no atom" gives recall 0.
  assert recall > 0.75 and empty_accuracy > 0.75, (recall, empty_accuracy)
