"""Priors over a trained model's latent space: where `--mode=sample` draws its latents.

A β-VAE trained at small β places its crystals far from its own prior N(0, I) (the shipped
perov_5 model: KL ~640 nats), so draws from N(0, I) decode to little that resembles a crystal.
Four priors, `config.sample.prior`:

* `learned` (the default): a denoising diffusion model (DDPM, Ho et al. 2020; v-prediction of
  Salimans & Ho 2022, stable at both ends of the cosine noise schedule of Nichol & Dhariwal 2021) over the standardised latent means of the
  training crystals; an MLP denoiser (`Denoiser`) trained with Adam and an exponential moving
  average of its weights, sampled with `sampling_steps` strided ancestral (DDIM η = 1) steps;
* `mixture`: a Gaussian mixture with `components` full-covariance components fitted by EM;
* `fitted`: the Gaussian of the training latent means;
* `standard`: N(0, I), the VAE's own.

Every prior draws `num` latents from a seed with its spread scaled by a temperature (1 = the
prior itself). A prior fitted to a model is saved in the model's workdir (`latent_prior/`:
`prior.json` and, per kind, `params/` (orbax) or `prior.npz`) and restored with it while the
model's checkpoint step and the prior's settings are the same.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Protocol

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from crystal_vae import checkpoints
from crystal_vae import progress

PRIORS = ("learned", "mixture", "fitted", "standard")
FOLDER = "latent_prior"


class Prior(Protocol):
  """What `--mode=sample` needs of a prior."""

  def sample(self, num: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """`num` latents (num, L), float32, a pure function of `seed`."""


# ---------------------------------------------------------------------------------------------
# Gaussians.


@dataclasses.dataclass(frozen=True)
class GaussianPrior:
  """z = mean + temperature · scale @ ε, ε ~ N(0, I)."""

  mean: np.ndarray  # (L,)
  scale: np.ndarray  # (L, L), lower triangular

  @classmethod
  def standard(cls, latent_dim: int) -> "GaussianPrior":
    """The VAE's prior N(0, I)."""
    return cls(np.zeros(latent_dim), np.eye(latent_dim))

  @classmethod
  def fitted(cls, latents: np.ndarray) -> "GaussianPrior":
    """The Gaussian of `latents` (N, L): their mean and the Cholesky factor of their covariance
    (plus 1e-6 of its mean variance on the diagonal, so that it factors when N <= L)."""
    latents = np.asarray(latents, np.float64)
    covariance = np.atleast_2d(np.cov(latents, rowvar=False))
    covariance += 1e-6 * np.mean(np.diag(covariance)) * np.eye(len(covariance))
    return cls(latents.mean(axis=0), np.linalg.cholesky(covariance))

  def sample(self, num: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal((num, len(self.mean)))
    return (self.mean + temperature * noise @ self.scale.T).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MixturePrior:
  """A Gaussian mixture: component k with probability weights[k], then as `GaussianPrior`."""

  weights: np.ndarray  # (K,)
  means: np.ndarray  # (K, L)
  scales: np.ndarray  # (K, L, L), lower triangular

  @classmethod
  def fitted(cls, latents: np.ndarray, components: int, seed: int = 0) -> "MixturePrior":
    """EM (scikit-learn) with `components` full-covariance components (at most N / 2), a
    covariance floor of 1e-4 of the latents' mean variance."""
    # pylint: disable=g-import-not-at-top  (scikit-learn is needed only for this prior)
    from sklearn import mixture
    latents = np.asarray(latents, np.float64)
    floor = 1e-4 * float(np.mean(np.var(latents, axis=0)))
    model = mixture.GaussianMixture(max(1, min(components, len(latents) // 2)),
                                    covariance_type="full", reg_covar=max(floor, 1e-9),
                                    random_state=seed, max_iter=200)
    model.fit(latents)
    return cls(model.weights_, model.means_, np.linalg.cholesky(model.covariances_))

  def sample(self, num: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(self.weights), size=num, p=self.weights / self.weights.sum())
    noise = rng.standard_normal((num, self.means.shape[1]))
    spread = np.einsum("nij,nj->ni", self.scales[chosen], noise)
    return (self.means[chosen] + temperature * spread).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The learned prior: a denoising diffusion model.


def _timestep_embedding(t: jax.Array, size: int) -> jax.Array:
  """Sinusoidal features (B, size) of t in [0, 1]."""
  frequencies = jnp.exp(-math.log(10_000.0) * jnp.arange(size // 2) / (size // 2))
  angles = 1000.0 * t[:, None] * frequencies[None]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Denoiser(nn.Module):
  """(noisy latents (B, L), t (B,) in [0, 1]) -> the velocity v = √ᾱ ε − √(1−ᾱ) x₀ (B, L): an
  MLP of `blocks` residual blocks of width `features`, each LayerNorm -> SiLU -> Dense with the
  time embedding added."""

  features: int
  blocks: int

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    embedding = nn.Dense(self.features)(nn.silu(nn.Dense(self.features)(
        _timestep_embedding(t, 128))))
    h = nn.Dense(self.features)(x)
    for _ in range(self.blocks):
      update = nn.Dense(self.features)(nn.silu(nn.LayerNorm()(h)) + embedding)
      h = h + nn.Dense(self.features)(nn.silu(nn.LayerNorm()(update)))
    return nn.Dense(x.shape[-1])(nn.silu(nn.LayerNorm()(h)))


def cosine_alpha_bar(t: jax.Array | np.ndarray) -> jax.Array:
  """ᾱ(t) of the cosine schedule (Nichol & Dhariwal 2021, s = 0.008), t in [0, 1]."""
  s = 0.008
  return jnp.cos((t + s) / (1 + s) * jnp.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2


# ᾱ is clipped away from 0 at t = 1, as in the schedule's β clipping at 0.999.
_MIN_ALPHA_BAR = 1e-5


def _alpha_bar(t: jax.Array) -> jax.Array:
  return jnp.clip(cosine_alpha_bar(t), _MIN_ALPHA_BAR, 1.0)


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
  """How the learned prior is built and trained (`config.sample.prior_*`, and fixed here: batch
  256, Adam 1e-3 cosine-decayed, weights averaged with decay 0.999)."""

  features: int
  blocks: int
  train_steps: int
  sampling_steps: int
  batch_size: int = 256
  learning_rate: float = 1e-3
  ema_decay: float = 0.999

  @classmethod
  def from_config(cls, settings: ml_collections.ConfigDict) -> "DiffusionSettings":
    return cls(features=settings.prior_features, blocks=settings.prior_blocks,
               train_steps=settings.prior_train_steps, sampling_steps=settings.prior_sampling_steps)


@dataclasses.dataclass(frozen=True)
class DiffusionPrior:
  """Latents = centre + spread · x, x drawn by the denoiser from N(0, I) noise."""

  params: Any
  centre: np.ndarray  # (L,)
  spread: np.ndarray  # (L,)
  settings: DiffusionSettings

  @classmethod
  def fitted(cls, latents: np.ndarray, settings: DiffusionSettings, seed: int = 0
             ) -> tuple["DiffusionPrior", list[float]]:
    """Trains the denoiser on `latents` (N, L); returns the prior (EMA weights) and the loss
    averaged over each tenth of training."""
    latents = np.asarray(latents, np.float32)
    centre = latents.mean(axis=0)
    spread = latents.std(axis=0) + 1e-6
    data = jnp.asarray((latents - centre) / spread)
    denoiser = Denoiser(settings.features, settings.blocks)
    key = jax.random.key(seed)
    params = denoiser.init(key, data[:1], jnp.zeros(1))
    schedule = optax.cosine_decay_schedule(settings.learning_rate, settings.train_steps, 0.01)
    optimiser = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))

    def loss_fn(params, x0, key):
      t_key, noise_key = jax.random.split(key)
      t = jax.random.uniform(t_key, (x0.shape[0],))
      noise = jax.random.normal(noise_key, x0.shape)
      alpha_bar = _alpha_bar(t)[:, None]
      noisy = jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1 - alpha_bar) * noise
      velocity = jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1 - alpha_bar) * x0
      return jnp.mean((denoiser.apply(params, noisy, t) - velocity) ** 2)

    @jax.jit
    def train_step(params, ema, opt_state, key):
      batch_key, loss_key = jax.random.split(key)
      index = jax.random.randint(batch_key, (settings.batch_size,), 0, data.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, data[index], loss_key)
      updates, opt_state = optimiser.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      ema = jax.tree.map(lambda e, p: settings.ema_decay * e + (1 - settings.ema_decay) * p,
                         ema, params)
      return params, ema, opt_state, loss

    opt_state = optimiser.init(params)
    ema = params
    losses = []
    counter = progress.Progress("learned prior: training", settings.train_steps, unit="steps")
    for step_key in jax.random.split(jax.random.fold_in(key, 1), settings.train_steps):
      params, ema, opt_state, loss = train_step(params, ema, opt_state, step_key)
      losses.append(loss)
      counter.advance()
    curve = [float(np.mean(chunk)) for chunk in np.array_split(np.asarray(losses), 10)]
    return cls(jax.device_get(ema), centre, spread, settings), curve

  def sample(self, num: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    x = _sample(self.params, self.settings.features, self.settings.blocks,
                self.settings.sampling_steps, num, len(self.centre), seed, temperature)
    return (self.centre + self.spread * np.asarray(x, np.float64)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _sample(params: Any, features: int, blocks: int, steps: int, num: int, dim: int, seed: int,
            temperature: float) -> jax.Array:
  """Strided ancestral sampling (DDIM with η = 1) from t = 1 to 0 in `steps` steps, the noise
  scaled by `temperature`."""
  denoiser = Denoiser(features, blocks)
  key = jax.random.key(seed)
  times = jnp.linspace(1.0, 0.0, steps + 1)

  def step(x, inputs):
    t, t_next, key = inputs
    alpha_bar, alpha_bar_next = _alpha_bar(t), jnp.where(t_next > 0, _alpha_bar(t_next), 1.0)
    velocity = denoiser.apply(params, x, jnp.full((num,), t))
    x0 = jnp.sqrt(alpha_bar) * x - jnp.sqrt(1 - alpha_bar) * velocity
    noise = jnp.sqrt(1 - alpha_bar) * x + jnp.sqrt(alpha_bar) * velocity
    variance = (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)
    direction = jnp.sqrt(jnp.clip(1 - alpha_bar_next - variance, 0.0)) * noise
    fresh = temperature * jax.random.normal(key, x.shape)
    return jnp.sqrt(alpha_bar_next) * x0 + direction + jnp.sqrt(variance) * fresh, None

  start_key, *step_keys = jax.random.split(key, steps + 1)
  x = temperature * jax.random.normal(start_key, (num, dim))
  x, _ = jax.lax.scan(step, x, (times[:-1], times[1:], jnp.stack(step_keys)))
  return x


# ---------------------------------------------------------------------------------------------
# Fitting, saving, restoring.


def description(settings: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings that make a prior (what a saved prior is compared with)."""
  kind = settings.prior
  if kind not in PRIORS:
    raise ValueError(f"sample.prior must be one of {PRIORS}, got {kind!r}")
  result: dict[str, Any] = {"kind": kind}
  if kind == "standard":
    return result
  result.update(crystals=settings.prior_crystals, seed=settings.seed)
  fraction = settings.prior_best_fraction
  if not 0 < fraction <= 1:
    raise ValueError(f"sample.prior_best_fraction must be in (0, 1], got {fraction}")
  if fraction < 1:  # (absent from priors fitted to every crystal, as before it existed)
    result["best_fraction"] = fraction
  if kind == "mixture":
    result["components"] = settings.prior_components
  if kind == "learned":
    result.update(dataclasses.asdict(DiffusionSettings.from_config(settings)))
  return result


def fit(settings: ml_collections.ConfigDict, latents: np.ndarray) -> tuple[Prior, dict]:
  """The prior `settings.prior` fitted to latent means (N, L); and what to record of it."""
  kind = settings.prior
  if kind == "fitted":
    return GaussianPrior.fitted(latents), {}
  if kind == "mixture":
    return MixturePrior.fitted(latents, settings.prior_components, settings.seed), {}
  if kind == "learned":
    prior, curve = DiffusionPrior.fitted(latents, DiffusionSettings.from_config(settings),
                                         settings.seed)
    return prior, {"loss_by_tenth_of_training": curve}
  raise ValueError(f"no fit for prior {kind!r}")


def save(prior: Prior, record: dict, directory: pathlib.Path) -> None:
  """Writes `prior` and `record` (its description, model step, ...) to `directory`."""
  directory.mkdir(parents=True, exist_ok=True)
  if isinstance(prior, DiffusionPrior):
    checkpoints.save_pytree(prior.params, directory / "params")
    np.savez(directory / "prior.npz", centre=prior.centre, spread=prior.spread)
  elif isinstance(prior, MixturePrior):
    np.savez(directory / "prior.npz", weights=prior.weights, means=prior.means,
             scales=prior.scales)
  elif isinstance(prior, GaussianPrior):
    np.savez(directory / "prior.npz", mean=prior.mean, scale=prior.scale)
  (directory / "prior.json").write_text(json.dumps(record, indent=1) + "\n")


def load(directory: pathlib.Path, expected: dict) -> Prior | None:
  """The prior saved in `directory` when its record's description equals `expected` and its
  files restore, else None (it is then fitted again)."""
  try:
    record = json.loads((directory / "prior.json").read_text())
  except (OSError, ValueError):
    return None
  if record.get("description") != expected:
    return None
  kind = expected["kind"]
  try:
    with np.load(directory / "prior.npz") as saved:
      arrays = dict(saved)
  except (OSError, ValueError):  # missing or cut short: fitted again
    return None
  if kind == "fitted":
    return GaussianPrior(arrays["mean"], arrays["scale"])
  if kind == "mixture":
    return MixturePrior(arrays["weights"], arrays["means"], arrays["scales"])
  settings = DiffusionSettings(**{field.name: expected[field.name]
                                  for field in dataclasses.fields(DiffusionSettings)})
  template = jax.eval_shape(lambda: Denoiser(settings.features, settings.blocks).init(
      jax.random.key(0), jnp.zeros((1, len(arrays["centre"]))), jnp.zeros(1)))
  try:
    params = checkpoints.restore_pytree(directory / "params", template)
  except checkpoints.CheckpointRestoreError:
    return None
  return DiffusionPrior(params, arrays["centre"], arrays["spread"], settings)
