"""Shared fixtures and helpers: a tiny training config over the embedded prototypes dataset, a
trained tiny checkpoint, the AFLOW prototypes as crystals, voxelisation of a batch, matching."""

import gzip
import itertools
import json
import os
import pathlib
import tempfile
import warnings

# Tests run on the CPU; several tests need more than one (virtual) device.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests train the same tiny models, in the pytest workers and in subprocesses (which inherit
# this): JAX's persistent cache compiles each computation once per machine, not once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"crystal_vae_tests_jax_cache_{os.getuid()}"))

# pylint: disable=g-import-not-at-top,wrong-import-position
from crystal_vae import process_settings

# The command line's process settings (XLA flags, malloc), before any JAX computation: the tests
# take the code paths a user's run takes (and subprocesses inherit the XLA flags).
process_settings.apply()

import jax
import ml_collections
import numpy as np
import pymatgen
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice
from pymatgen.util.provenance import StructureNL
from scipy import optimize

from crystal_vae import crystals
from crystal_vae.configs import recipes
from crystal_vae import reconstruction
from crystal_vae import segmentation
from crystal_vae import train
from crystal_vae import voxelize
from crystal_vae.native import kernels


def require_native() -> None:
  """The native kernels need a C++ compiler; where there is one they must build."""
  if kernels._compiler() is None:  # pylint: disable=protected-access
    pytest.skip("no C++ compiler")
  assert kernels.available(), "kernels.cc did not build or load (see the log)"


def tiny_config(data_dir: str, representation: str = "repeat") -> ml_collections.ConfigDict:
  """A model small enough to compile and train a few steps in seconds on 2 CPU cores."""
  config = recipes.get_config(representation, "quick")
  paper = recipes.get_config(representation)
  # The embedded AFLOW prototypes build in seconds; a tiny model with a U-Net and no composition
  # head, as the quick recipe's learning settings otherwise give.
  config.dataset.name = "prototypes"
  config.dataset.data_dir = data_dir
  config.model.segmenter = True
  config.loss.teacher_forcing = 1.0
  config.model.encoder_strides = paper.model.encoder_strides
  config.model.composition_head = False
  config.loss.composition_weight = paper.loss.composition_weight
  config.lr_mults = ()
  config.loss.beta = paper.loss.beta
  config.eval.symprec = 0.0
  config.eval.min_site_z = 3.0
  config.eval.after_training = 0
  config.eval.refine_steps = 0
  config.voxel.grid = 16
  config.model.latent_dim = 8
  config.model.encoder_features = (4, 4, 8, 8)
  config.model.decoder_start = 2
  config.model.decoder_features = (8, 4, 4)
  config.model.decoder_paddings = ("SAME", "SAME", "SAME")
  config.model.unet_features = (4, 8)
  config.batch_size = 8
  # Two to four steps: no warm-up, no clipping, a ReLU output and a rate at which they move the
  # decoder enough for the generation and discriminator tests to see different latents.
  config.warmup_steps = 0
  config.grad_clip_norm = 0.0
  config.model.decoder_output = "relu"
  config.learning_rate = 1e-3
  config.eval.batch_size = 8
  config.eval.num_batches = 1
  # A learned latent prior that trains in a second or two.
  config.sample.prior_crystals = 24
  config.sample.prior_features = 32
  config.sample.prior_blocks = 1
  config.sample.prior_train_steps = 50
  config.sample.prior_sampling_steps = 10
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  return config


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  """One TFDS data dir per pytest run, so each dataset is built once."""
  return str(tmp_path_factory.mktemp("tfds"))


SPEC = voxelize.GridSpec()  # 30^3 voxels in a 10 Å cube, species radius 0.5 Å.
MATCHER = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
# Prototypes of different lattice systems and sizes: e.g. Cu (fcc), W (bcc), Mg (hcp), NaCl,
# CsCl, spinel MgAl2O4 (14 atoms), calcite (10), triclinic cells.
REPRESENTATIVE = ("Cu", "W", "Mg", "NaCl", "CsCl", "ZnS", "CaF2", "TiO2", "Al2O3", "MgAl2O4")


def voxelize_crystals(batch_crystals, representation, random_offset=False, seed=0, rotate=False):
  """One padded batch through `voxelize_batch`; returns numpy arrays."""
  batch = crystals.stack_crystals(batch_crystals)
  result = voxelize.voxelize_batch(
      batch, jax.random.key(seed), spec=SPEC, representation=representation, rotate=rotate,
      random_offset=random_offset,
      num_images=voxelize.num_images_for(batch["lattice"], SPEC, representation, False))
  return {name: np.asarray(value) for name, value in result.items()}


def prototypes(limits=crystals.CrystalLimits()):
  path = pathlib.Path(pymatgen.__path__[0]) / "analysis/prototypes/aflow_prototypes.json.gz"
  with gzip.open(path, "rt") as handle:
    entries = json.load(handle)
  found = []
  for index, entry in enumerate(entries):
    try:
      found.append(crystals.crystal_from_structure(
          StructureNL.from_dict(entry["snl"]).structure, f"aflow_{index}", limits))
    except crystals.RejectedCrystal:
      continue
  return found


def matches(result: reconstruction.Reconstruction, crystal: crystals.Crystal) -> bool:
  true = crystal.to_structure()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return (result.valid and len(result.structure) == len(true.get_primitive_structure())
            and MATCHER.fit(result.structure, true))


def representative_prototypes():
  chosen = {}
  for crystal in prototypes():
    formula = crystal.to_structure().composition.reduced_formula
    if formula in REPRESENTATIVE and formula not in chosen:
      chosen[formula] = crystal
  # Plus two low-symmetry cells (monoclinic / triclinic: all angles away from 90 and 120).
  low = [c for c in prototypes() if np.linalg.norm(c.lattice, axis=1).max() < 7.0
         and np.all(np.abs(np.array(Lattice(c.lattice).angles) - 90) > 1)]
  return list(chosen.values()) + low[:2]


def small_config(tfds_dir: str, conditional_model: bool = False):
  """`tiny_config` trained for 2 steps, with small generation settings."""
  config = tiny_config(tfds_dir)
  config.model.conditional = conditional_model
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.sample.num = 6
  config.sample.batch_size = 4
  config.sample.num_train_structures = 12
  config.sample.gallery = 4
  config.interpolate.steps = 3
  config.traverse.steps = 3
  config.conditional.targets = (0.5, 1.0, 2.0, 4.0)
  config.conditional.num_samples = 4
  config.conditional.batch_size = 4
  config.discriminator.features = (4, 8)
  config.discriminator.batch_size = 8
  config.discriminator.num_real = 12
  config.discriminator.num_eval = 4
  return config


def trained_checkpoint(tmp_path_factory, tfds_dir: str, conditional_model: bool = False
                       ) -> pathlib.Path:
  """A workdir with a 2-step checkpoint, trained once per pytest run (shared by modules)."""
  workdir = tmp_path_factory.getbasetemp() / ("conditional" if conditional_model else "tiny")
  if not (workdir / "checkpoints" / "2").exists():
    config = small_config(tfds_dir, conditional_model)
    config.eval.split = "none"  # no evaluation while training: the checkpoint is all we need
    train.train_and_evaluate(config, str(workdir))
  return workdir


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: trains or runs whole modes (minutes); "
                          "`pytest -m 'not slow'` leaves them out")


HALF_VOXEL = 0.5 * SPEC.voxel_size


def unit_cell_positions(crystal):
  """Cube coordinates of the atoms of the unrotated unit-cell placement: each atom's image
  nearest the cell centre, the cell centre at the cube centre."""
  lattice = crystal.lattice.astype(np.float32).astype(np.float64)
  frac = crystal.frac_coords.astype(np.float32)  # As voxelize wraps them: 1 - 1e-9 -> 0.
  frac = (frac - np.floor(frac)).astype(np.float64)
  shifts = np.array([(0, 0, 0)] + [n for n in itertools.product((-1, 0, 1), repeat=3) if any(n)])
  candidates = frac[:, None] + shifts[None]
  distance = np.linalg.norm((candidates - 0.5) @ lattice, axis=-1)
  best = np.argmax(distance <= distance.min(axis=1, keepdims=True) + 1e-3, axis=1)
  frac = candidates[np.arange(len(frac)), best]
  return frac @ lattice + SPEC.box / 2 - 0.5 * lattice.sum(axis=0)


def assert_same_atoms(found: segmentation.Atoms, species, positions):
  """Counts equal, and a one-to-one assignment with equal species within half a voxel."""
  assert len(found) == len(species)
  distance = np.linalg.norm(found.positions[:, None] - positions[None], axis=-1)
  rows, cols = optimize.linear_sum_assignment(distance)
  np.testing.assert_array_equal(found.species[rows], np.asarray(species)[cols])
  assert distance[rows, cols].max() < HALF_VOXEL
