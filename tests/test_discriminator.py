"""Discriminator: losses by hand, the latent mixture, training on a tiny VAE, the mode."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crystal_vae import checkpoints
from crystal_vae import datasets
from crystal_vae import discriminator
from crystal_vae import generation
from crystal_vae import inference
from crystal_vae import latent_prior
from crystal_vae import modes
from conftest import small_config, trained_checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tfds_dir):
  return trained_checkpoint(tmp_path_factory, tfds_dir)


def test_losses_against_hand_values():
  logits, target = jnp.zeros(2), jnp.array([0.5, 1.0])
  # sigmoid(0) = 0.5: BCE = -t log 0.5 - (1 - t) log 0.5 = log 2; MSE = (0 + 0.25) / 2.
  np.testing.assert_allclose(discriminator.loss_of(logits, target, "bce"), np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(discriminator.loss_of(logits, target, "mse"), 0.125, rtol=1e-6)
  with pytest.raises(ValueError):
    discriminator.loss_of(logits, target, "hinge")


@pytest.mark.slow
def test_mixture_moments():
  real = jnp.full((1, 3), 2.0)  # z = λ ε + (1 − λ) 2, ε ~ N(0, 1), λ ~ U[0, 1]
  z, condition, mix = discriminator.mixed_latents(jax.random.key(0), real, None, 20_000)
  assert condition is None and z.shape == (20_000, 3)
  assert float(mix.min()) >= 0.0 and float(mix.max()) <= 1.0
  np.testing.assert_allclose(np.mean(z, axis=0), 1.0, atol=0.03)  # E = 2 E[1 − λ] = 1
  np.testing.assert_allclose(np.var(z, axis=0), 1 / 3 + 4 / 12, atol=0.03)  # E[λ²] + 4 Var λ
  residual = (z - (1 - mix[:, None]) * 2.0) / mix[:, None]  # = ε
  np.testing.assert_allclose(np.std(residual, axis=0), 1.0, atol=0.03)


@pytest.mark.slow
def test_training_reduces_the_loss_and_outputs_lie_in_unit_interval(workdir, tfds_dir, tmp_path):
  config = small_config(tfds_dir)
  settings = config.discriminator
  settings.num_train_steps = 40
  settings.learning_rate = 1e-2
  settings.log_every_steps = 10
  model = inference.TrainedModel.restore(workdir)
  real, conditions = model.encode_crystals(
      generation.training_crystals(config, settings.num_real, 0), settings.batch_size)
  trainer = discriminator.Trainer(model, settings)
  initial, _ = trainer.init(settings.seed)
  params, losses = trainer.train(real, conditions)
  assert losses.shape == (40,) and np.all(np.isfinite(losses))
  keys = [jax.random.key(100 + i) for i in range(4)]  # the same held-out mixtures before/after
  before = np.mean([trainer.mixed_loss(initial, key, real) for key in keys])
  after = np.mean([trainer.mixed_loss(params, key, real) for key in keys])
  assert after < before - 0.01 and after < np.log(2.0)  # better than predicting λ = 1/2
  scores = trainer.score_latents(params, latent_prior.GaussianPrior.standard(8).sample(5, 0, 3.0))
  assert scores.shape == (5,) and np.all((scores >= 0) & (scores <= 1))
  checkpoints.save_pytree(params, tmp_path / "params")
  restored = checkpoints.restore_pytree(tmp_path / "params", initial)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_discriminator_mode_writes_summary_and_params(workdir, tfds_dir):
  config = small_config(tfds_dir)
  config.discriminator.num_train_steps = 4
  config.discriminator.log_every_steps = 2
  modes.run("discriminator", config, str(workdir))
  out_dir = workdir / "discriminator"
  saved = json.loads((out_dir / "summary.json").read_text())
  assert saved["num_eval"] == 4 and saved["num_real"] == 12
  # "real" recomputed from the saved parameters: the first 4 validation crystals' latent means.
  model = inference.TrainedModel.restore(workdir)
  trainer = discriminator.Trainer(model, config.discriminator)
  params = checkpoints.restore_pytree(out_dir / "params", trainer.init(0)[0])
  source = datasets.split_source(config.dataset, "validation")
  latents, conditions = model.encode_crystals(
      [datasets.record_to_crystal(source[i]) for i in range(4)])
  scores = trainer.score_latents(params, latents, conditions)
  assert saved["real_mean"] == pytest.approx(float(scores.mean()), rel=1e-5)
  assert saved["real_std"] == pytest.approx(float(scores.std()), rel=1e-4, abs=1e-7)
  # "random" and "out_of_distribution": N(0, I) draws of seeds seed + 1 and seed + 2, the latter
  # spread by ood_scale, drawn here with numpy.
  settings = config.discriminator
  for name, offset, scale in (("random", 1, 1.0), ("out_of_distribution", 2, settings.ood_scale)):
    noise = np.random.default_rng(settings.seed + offset).standard_normal(
        (4, config.model.latent_dim))
    scores = trainer.score_latents(params, (scale * noise).astype(np.float32))
    assert saved[f"{name}_mean"] == pytest.approx(float(scores.mean()), rel=1e-5)
    assert saved[f"{name}_std"] == pytest.approx(float(scores.std()), rel=1e-4, abs=1e-7)
  # "prior": draws of the model's own prior (the learned one, saved in the workdir), seed + 3.
  assert saved["prior"]["kind"] == "learned"
  prior = latent_prior.load(workdir / "latent_prior", saved["prior"])
  scores = trainer.score_latents(params, prior.sample(4, settings.seed + 3))
  assert saved["prior_mean"] == pytest.approx(float(scores.mean()), rel=1e-5)
  assert (out_dir / "scores.png").exists()
