"""Shared fixtures: a tiny training config over the embedded prototypes dataset."""

import os
import tempfile

# Tests run on the CPU; several tests need more than one (virtual) device.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests train the same tiny models, in the pytest workers and in subprocesses (which inherit
# this): JAX's persistent cache compiles each computation once per machine, not once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"crystal_vae_tests_jax_cache_{os.getuid()}"))

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from crystal_vae import default_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_config(data_dir: str, representation: str = "repeat") -> ml_collections.ConfigDict:
  """A model small enough to compile and train a few steps in seconds on 2 CPU cores."""
  config = default_config.get_config(representation, "quick")
  config.dataset.data_dir = data_dir
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
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  return config


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  """One TFDS data dir per test session, so the prototypes dataset is built once."""
  return str(tmp_path_factory.mktemp("tfds"))
