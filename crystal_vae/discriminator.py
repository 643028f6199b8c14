"""`--mode=discriminator`: how far decoded densities are from those of real crystals (appendix 9).

A small 3-D convolutional network sees decoded densities of mixed latents
z = λ · z_random + (1 − λ) · z_real, with λ ~ U[0, 1], z_random ~ N(0, 1) and z_real the latent
mean of a random one of `num_real` training crystals, and regresses λ through a sigmoid. The
loss is `config.discriminator.loss`: "bce", binary cross-entropy with the soft target λ, or
"mse", the squared error of the sigmoid output; both are minimised by E[λ | density], and BCE
keeps the gradient of a saturated sigmoid. The VAE is frozen.

Its output (0: looks like a decoded real crystal, 1: looks like a random draw) is then reported,
mean ± std as in the paper, for: decoded latent means of `num_eval` crystals of
`config.eval.split` ("real"), draws z ~ N(0, 1) ("random", the paper's), draws of the model's
own prior (`config.sample.prior`, what `--mode=sample` decodes: "prior") and draws
z ~ N(0, ood_scale²) ("out_of_distribution"). A conditional VAE decodes each mixed latent with its real crystal's
condition, and the draws with conditions drawn from the real crystals'.

Writes `WORKDIR/discriminator/` with `summary.json`, `params/` (orbax) and `scores.png`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from crystal_vae import checkpoints
from crystal_vae import datasets
from crystal_vae import generation
from crystal_vae import inference
from crystal_vae import latent_prior
from crystal_vae import plots
from crystal_vae import models
from crystal_vae import writing

LOSSES = ("bce", "mse")


class Discriminator(nn.Module):
  """Density (B, G, G, G) -> logit (B,): strided Conv3D k3 s2 + LeakyReLU per feature count,
  global average pooling, Dense(1)."""

  features: Sequence[int] = (8, 16, 32)

  @nn.compact
  def __call__(self, density: jax.Array) -> jax.Array:
    x = density[..., None]
    for features in self.features:
      x = nn.leaky_relu(models.Conv3D(features, 3, 2, "SAME")(x))
    return nn.Dense(1)(jnp.mean(x, axis=(1, 2, 3)))[:, 0]


def loss_of(logits: jax.Array, target: jax.Array, loss: str) -> jax.Array:
  """Mean BCE (soft targets) or MSE of the sigmoid output."""
  if loss == "bce":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
  if loss == "mse":
    return jnp.mean((jax.nn.sigmoid(logits) - target) ** 2)
  raise ValueError(f"discriminator loss {loss!r} not in {LOSSES}")


def mixed_latents(key: jax.Array, real_latents: jax.Array, real_conditions: jax.Array | None,
                  batch_size: int) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """(z, condition or None, λ) for a batch: λ z_random + (1 − λ) z_real, λ ~ U[0, 1]."""
  index_key, normal_key, mix_key = jax.random.split(key, 3)
  index = jax.random.randint(index_key, (batch_size,), 0, real_latents.shape[0])
  z_real = real_latents[index]
  z_random = jax.random.normal(normal_key, z_real.shape, z_real.dtype)
  mix = jax.random.uniform(mix_key, (batch_size,))
  z = mix[:, None] * z_random + (1.0 - mix[:, None]) * z_real
  return z, None if real_conditions is None else real_conditions[index], mix


class Trainer:
  """The jitted training step and scoring of a discriminator on one frozen VAE (its variables
  are an argument of the jitted functions, not constants baked into them)."""

  def __init__(self, model: inference.TrainedModel, settings: ml_collections.ConfigDict):
    self.model = model
    self.settings = settings
    self.vae = models.model_from_config(model.config)
    self.network = Discriminator(tuple(settings.features))
    self.optimizer = optax.adam(settings.learning_rate)
    self._step = jax.jit(self._train_step)
    self._logits = jax.jit(lambda params, density: self.network.apply({"params": params}, density))
    self._mixed_loss = jax.jit(self._loss_on_mixture)

  def _decode(self, vae_variables, z: jax.Array, condition: jax.Array | None) -> jax.Array:
    return self.vae.apply(vae_variables, z, train=False, condition=condition, method="decode")

  def init(self, seed: int) -> tuple[dict, optax.OptState]:
    grid = self.model.config.voxel.grid
    params = self.network.init(jax.random.key(seed), jnp.zeros((1, grid, grid, grid)))["params"]
    return params, self.optimizer.init(params)

  def _loss_on_mixture(self, params, vae_variables, key, real_latents, real_conditions):
    z, condition, mix = mixed_latents(key, real_latents, real_conditions,
                                      self.settings.batch_size)
    density = jax.lax.stop_gradient(self._decode(vae_variables, z, condition))
    return loss_of(self.network.apply({"params": params}, density), mix, self.settings.loss)

  def _train_step(self, params, opt_state, vae_variables, key, real_latents, real_conditions):
    loss, grads = jax.value_and_grad(self._loss_on_mixture)(params, vae_variables, key,
                                                            real_latents, real_conditions)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def mixed_loss(self, params, key: jax.Array, real_latents: np.ndarray,
                 real_conditions: np.ndarray | None = None) -> float:
    """The loss on one mixed batch drawn from `key` (for comparisons on a fixed batch)."""
    conditions = None if real_conditions is None else jnp.asarray(real_conditions)
    return float(self._mixed_loss(params, self.model.variables, key, jnp.asarray(real_latents),
                                  conditions))

  def train(self, real_latents: np.ndarray, real_conditions: np.ndarray | None = None
            ) -> tuple[dict, np.ndarray]:
    """Trains for `settings.num_train_steps`; returns the parameters and the loss per step."""
    settings = self.settings
    params, opt_state = self.init(settings.seed)
    key = jax.random.fold_in(jax.random.key(settings.seed), 1)
    real_latents = jnp.asarray(real_latents)
    real_conditions = None if real_conditions is None else jnp.asarray(real_conditions)
    losses = []
    for step in range(settings.num_train_steps):
      params, opt_state, loss = self._step(params, opt_state, self.model.variables,
                                           jax.random.fold_in(key, step), real_latents,
                                           real_conditions)
      losses.append(loss)
      if (step + 1) % settings.log_every_steps == 0:
        logging.info("discriminator step %d/%d  loss %.5f", step + 1, settings.num_train_steps,
                     float(np.mean(jax.device_get(losses[-settings.log_every_steps:]))))
    return params, np.asarray(jax.device_get(losses), np.float64)

  def score_densities(self, params, density: np.ndarray) -> np.ndarray:
    """Sigmoid outputs in [0, 1] for decoded densities (B, G, G, G)."""
    return np.asarray(jax.nn.sigmoid(self._logits(params, jnp.asarray(density))))

  def score_latents(self, params, z: np.ndarray, condition: np.ndarray | None = None
                    ) -> np.ndarray:
    """Sigmoid outputs for latents, decoded in batches."""
    grids = self.model.decode(z, condition, self.settings.batch_size)
    return self.score_densities(params, grids["density"])


def discriminate(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
                 out_dir: pathlib.Path) -> dict:
  """`--mode=discriminator`: see the module docstring."""
  train_crystals = generation.training_crystals(model.config, settings.num_real, settings.seed)
  real_latents, real_conditions = model.encode_crystals(train_crystals, settings.batch_size)
  trainer = Trainer(model, settings)
  params, losses = trainer.train(real_latents, real_conditions)

  source = datasets.split_source(model.config.dataset, model.config.eval.split)
  eval_crystals = [datasets.record_to_crystal(source[i])
                   for i in range(min(settings.num_eval, len(source)))]
  eval_latents, eval_conditions = model.encode_crystals(eval_crystals, settings.batch_size)
  num = eval_latents.shape[0]
  latent_dim = model.config.model.latent_dim
  draw_conditions = None
  if real_conditions is not None:
    draw_conditions = np.random.default_rng(settings.seed).choice(real_conditions, size=num)
  standard = latent_prior.GaussianPrior.standard(latent_dim)
  prior, prior_description = generation.prior_of(model, model.config.sample)
  scores = {
      "real": trainer.score_latents(params, eval_latents, eval_conditions),
      "random": trainer.score_latents(params, standard.sample(num, settings.seed + 1),
                                      draw_conditions),
      "prior": trainer.score_latents(params, prior.sample(num, settings.seed + 3),
                                     draw_conditions),
      "out_of_distribution": trainer.score_latents(
          params, standard.sample(num, settings.seed + 2, settings.ood_scale), draw_conditions),
  }
  window = max(1, min(settings.log_every_steps, losses.size))
  results = {"loss": settings.loss, "num_train_steps": settings.num_train_steps,
             "num_real": len(train_crystals), "num_eval": num,
             "eval_split": model.config.eval.split,
             "ood_scale": settings.ood_scale, "prior": prior_description,
             "loss_first": float(losses[:window].mean()),
             "loss_last": float(losses[-window:].mean()),
             **{f"{name}_mean": float(values.mean()) for name, values in scores.items()},
             **{f"{name}_std": float(values.std()) for name, values in scores.items()}}
  out_dir.mkdir(parents=True, exist_ok=True)
  checkpoints.save_pytree(params, out_dir / "params")
  plots.plot_discriminator_scores(scores, losses, out_dir / "scores.png")
  writing.write_json(out_dir / "summary.json", results)
  print(f"Discriminator ({settings.loss}, {settings.num_train_steps} steps, loss "
        f"{results['loss_first']:.4f} -> {results['loss_last']:.4f}) written to {out_dir}")
  print(f"  {'samples':<22}{'output mean ± std':>20}")
  for name, values in scores.items():
    print(f"  {name:<22}{values.mean():>11.3f} ± {values.std():.3f}")
  return results
