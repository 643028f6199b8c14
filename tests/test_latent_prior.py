"""The latent priors of `--mode=sample`: each recovers a known distribution from its draws; a
fitted prior is saved and restored with its settings."""

import json

import ml_collections
import numpy as np
import pytest

from crystal_vae import latent_prior

# A known 2-D mixture: three well separated modes with unequal weights.
MODES = np.array([[-4.0, 0.0], [3.0, 3.0], [3.0, -3.0]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
SPREAD = 0.5


def _mixture_draws(num: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(WEIGHTS), size=num, p=WEIGHTS)
  return MODES[chosen] + SPREAD * rng.standard_normal((num, 2))


def _assert_recovers_the_mixture(draws: np.ndarray, weight_tolerance: float,
                                 spread_range: tuple[float, float]) -> None:
  """Each draw assigned to its nearest mode: the modes' shares, centres and spreads."""
  nearest = np.argmin(((draws[:, None] - MODES[None]) ** 2).sum(-1), axis=1)
  shares = np.bincount(nearest, minlength=len(MODES)) / len(draws)
  np.testing.assert_allclose(shares, WEIGHTS, atol=weight_tolerance)
  for mode, centre in enumerate(MODES):
    near = draws[nearest == mode]
    np.testing.assert_allclose(near.mean(axis=0), centre, atol=0.25)
    assert spread_range[0] < near.std(axis=0).mean() < spread_range[1]


def test_fitted_gaussian_recovers_a_known_gaussian_and_draws_from_it():
  """`GaussianPrior.fitted` on 20,000 draws of a known 3-D Gaussian gives back its mean and
  covariance; its draws have them too (temperature 2: four times the covariance); the standard
  prior draws numpy's standard normals."""
  mean = np.array([1.0, -2.0, 0.5])
  covariance = np.array([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
  latents = np.random.default_rng(0).multivariate_normal(mean, covariance, size=20_000)
  prior = latent_prior.GaussianPrior.fitted(latents)
  np.testing.assert_allclose(prior.mean, mean, atol=0.03)
  np.testing.assert_allclose(prior.scale @ prior.scale.T, covariance, atol=0.05)
  draws = prior.sample(20_000, seed=1, temperature=2.0)
  np.testing.assert_allclose(draws.mean(axis=0), mean, atol=0.06)
  np.testing.assert_allclose(np.cov(draws, rowvar=False), 4 * covariance, atol=0.2)
  standard = latent_prior.GaussianPrior.standard(3)
  np.testing.assert_array_equal(standard.sample(5, seed=4),
                                np.random.default_rng(4).standard_normal((5, 3)).astype(np.float32))


def test_mixture_prior_recovers_a_known_mixture():
  prior = latent_prior.MixturePrior.fitted(_mixture_draws(4000, 0), components=3)
  order = np.argsort(prior.means[:, 0] * 10 + prior.means[:, 1])  # (-4, 0), (3, -3), (3, 3)
  np.testing.assert_allclose(prior.weights[order], WEIGHTS[[0, 2, 1]], atol=0.03)
  np.testing.assert_allclose(prior.means[order], MODES[[0, 2, 1]], atol=0.05)
  _assert_recovers_the_mixture(prior.sample(4000, seed=1), 0.03, (0.45, 0.55))


@pytest.mark.slow
def test_learned_prior_recovers_a_known_mixture():
  """The diffusion prior, trained on 4,000 draws of the mixture, draws its three modes with their
  weights (within 0.06), centres (within 0.25) and about their spread; its draws are a pure
  function of the seed, and temperature 0 sends them to the modes' centres."""
  settings = latent_prior.DiffusionSettings(features=128, blocks=2, train_steps=1500,
                                            sampling_steps=50)
  prior, curve = latent_prior.DiffusionPrior.fitted(_mixture_draws(4000, 0), settings)
  assert curve[-1] < curve[0]
  draws = prior.sample(4000, seed=1)
  _assert_recovers_the_mixture(draws, 0.06, (0.35, 0.8))
  np.testing.assert_array_equal(prior.sample(8, seed=3), prior.sample(8, seed=3))
  assert not np.array_equal(prior.sample(8, seed=3), prior.sample(8, seed=4))
  cold = prior.sample(400, seed=2, temperature=0.0)
  assert np.min(np.linalg.norm(cold[:, None] - MODES[None], axis=-1), axis=1).max() < 1.0


def _settings(**overrides) -> ml_collections.ConfigDict:
  settings = ml_collections.ConfigDict(dict(
      prior="learned", prior_crystals=100, seed=0, prior_components=2, prior_features=16,
      prior_blocks=1, prior_train_steps=20, prior_sampling_steps=5, prior_best_fraction=1.0))
  settings.update(overrides)
  return settings


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["learned", "mixture", "fitted"])
def test_a_saved_prior_restores_with_its_settings_only(kind, tmp_path):
  """save -> load gives the same draws; another setting (or model step) gives None: refit."""
  settings = _settings(prior=kind)
  prior, extra = latent_prior.fit(settings, _mixture_draws(200, 0))
  description = {**latent_prior.description(settings), "model_step": 7}
  latent_prior.save(prior, {"description": description, **extra}, tmp_path)
  restored = latent_prior.load(tmp_path, description)
  np.testing.assert_allclose(restored.sample(6, seed=2), prior.sample(6, seed=2), rtol=1e-6)
  assert json.loads((tmp_path / "prior.json").read_text())["description"] == description
  assert latent_prior.load(tmp_path, {**description, "model_step": 8}) is None
  other = {**latent_prior.description(_settings(prior=kind, seed=1)), "model_step": 7}
  assert latent_prior.load(tmp_path, other) is None
  assert latent_prior.load(tmp_path / "missing", description) is None
  (tmp_path / "prior.npz").unlink()  # a record without its arrays: fitted again, no crash
  assert latent_prior.load(tmp_path, description) is None


def test_an_unknown_prior_is_refused():
  with pytest.raises(ValueError, match="sample.prior must be one of"):
    latent_prior.description(_settings(prior="uniform"))


def test_a_prior_of_the_best_reconstructed_crystals_is_another_prior():
  """A fraction below 1 is part of the description (a prior saved for another fraction is fitted
  again); at 1 the description is the one priors were saved with before the setting existed."""
  assert "best_fraction" not in latent_prior.description(_settings())
  assert latent_prior.description(_settings(prior_best_fraction=0.8))["best_fraction"] == 0.8
  for fraction in (0.0, 1.5):
    with pytest.raises(ValueError, match="prior_best_fraction must be in"):
      latent_prior.description(_settings(prior_best_fraction=fraction))
