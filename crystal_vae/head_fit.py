"""Heads fitted to a trained model's frozen latent space: numeric properties, or the composition.

Joint training (`model.properties` with `loss.property_weight`, `model.composition_head`,
train.py) shapes the latent for the heads as well, at the cost of a full training run. Fitting a
head afterwards adds one to a model already trained (e.g. the shipped `pretrained/perov5_repeat`,
whose train step takes ~100 s on a 2-core CPU), or replaces one, in minutes: the crystals of the
training and validation splits are encoded once (latent means and log-variances), and an MLP of
the joint head's shape is fitted with Adam on minibatches, keeping the parameters of the lowest
validation loss (the head reads the latent MEANS of the validation crystals):
  property     `models.PropertyHead` on the properties standardised by the training split, rows
               without a value masked; squared error.
  composition  `models.CompositionHead` (`model.composition_hidden` widths) on each crystal's
               fraction of atoms per Z; cross-entropy. Needs a model trained with a composition
               head (its encoder reads the composition into the latent). The joint head reads
               only the training crystals' means and overfits them; drawing the training inputs
               from the posterior (z ~ N(mean, exp(logvar))) and dropping out hidden units
               generalises far better (docs/evaluation.md, "Species from the composition and the density");
               an ensemble of such heads, each fitted alone with its own seed, better still.
The result is a workdir like a jointly trained one, so every mode uses it unchanged.
"""

from collections.abc import Callable, Sequence
import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
from flax import linen as nn
import ml_collections
import numpy as np
import optax

from crystal_vae import checkpoints
from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae import inference
from crystal_vae import losses
from crystal_vae import metrics
from crystal_vae import models
from crystal_vae import progress
from crystal_vae import species_choice
from crystal_vae import train
from crystal_vae import writing

# Loss of a head's outputs (B, T) against its targets (B, T), per example (B,).
HeadLoss = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
  """A split's latent means and log-variances (N, L) and a head's targets (N, T)."""
  means: np.ndarray
  logvars: np.ndarray
  targets: np.ndarray


def encode_split(model: inference.TrainedModel, split: str,
                 targets: Callable[[crystals.Crystal], np.ndarray], limit: int = 0,
                 batch_size: int = 32) -> EncodedSplit:
  """The latent posteriors of the first `limit` (0: all) crystals of the model's dataset split,
  voxelised as at evaluation, with `targets` of each crystal."""
  source = datasets.split_source(model.config.dataset, split)
  count = len(source) if limit <= 0 else min(limit, len(source))
  structures = [datasets.record_to_crystal(source[index]) for index in range(count)]
  means, logvars, _ = model.encode_posteriors(structures, batch_size=batch_size)
  return EncodedSplit(means, logvars, np.stack([targets(crystal) for crystal in structures]))


def atom_counts(crystal: crystals.Crystal, max_z: int) -> np.ndarray:
  """(max_z + 1,) the crystal's number of atoms per Z, the composition head's target."""
  return np.bincount(crystal.atomic_numbers, minlength=max_z + 1).astype(np.float32)


def composition_loss(logits: jax.Array, counts: jax.Array) -> jax.Array:
  """Cross-entropy of the composition head's softmax against the true fractions per Z."""
  return optax.softmax_cross_entropy(logits, counts / jnp.sum(counts, axis=-1, keepdims=True))


def composition_exact(logits: np.ndarray, counts: np.ndarray) -> float:
  """The fraction of crystals whose composition the head gets exactly: its fractions rounded to
  the crystal's atom count are the true counts (`species_choice.composition_is_exact`)."""
  fractions = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
  return float(np.mean([species_choice.composition_is_exact(predicted, true)
                        for predicted, true in zip(fractions, counts)]))


def fit_head(head: nn.Module, loss: HeadLoss, train_split: EncodedSplit,
             validation_split: EncodedSplit, *, steps: int, learning_rate: float,
             batch_size: int, seed: int, posterior_noise: float = 0.0, eval_every: int = 50
             ) -> tuple[dict, list[dict[str, float]]]:
  """The parameters of `head` (called as `head(z, train)`) fitted by Adam to minimise the mean
  `loss` over minibatches of `train_split`, those of the lowest validation loss over the
  evaluations every `eval_every` steps, and the curve of (step, train, validation) losses. A
  training input is mean + `posterior_noise` · exp(logvar / 2) · ε (ε ~ N(0, 1)) with
  `train=True` (dropout); evaluation reads the means."""
  init_key, order_key = jax.random.split(jax.random.key(seed))
  params = head.init(init_key, jnp.zeros((1, train_split.means.shape[1]), jnp.float32))
  tx = optax.adam(learning_rate)

  def mean_loss(params, z, targets, dropout_key=None):
    outputs = head.apply(params, z, train=dropout_key is not None,
                         rngs=None if dropout_key is None else {"dropout": dropout_key})
    return jnp.mean(loss(outputs, targets))

  train_means, train_targets = jnp.asarray(train_split.means), jnp.asarray(train_split.targets)
  train_scales = posterior_noise * jnp.exp(jnp.asarray(train_split.logvars) / 2)
  count = train_split.means.shape[0]

  @jax.jit
  def step_fn(params, opt_state, key):
    rows_key, noise_key, dropout_key = jax.random.split(key, 3)
    rows = jax.random.choice(rows_key, count, (min(batch_size, count),), replace=False)
    z = train_means[rows] + train_scales[rows] * jax.random.normal(
        noise_key, train_means[rows].shape)
    value, grads = jax.value_and_grad(mean_loss)(params, z, train_targets[rows], dropout_key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  evaluate = jax.jit(mean_loss)
  validation = (jnp.asarray(validation_split.means), jnp.asarray(validation_split.targets))
  opt_state, curve = tx.init(params), []
  best_params, best_loss = params, float(evaluate(params, *validation))
  counter = progress.Progress("head fit:", steps, unit="steps")
  for step in range(1, steps + 1):
    params, opt_state, _ = step_fn(params, opt_state, jax.random.fold_in(order_key, step))
    counter.advance()
    if step % eval_every == 0 or step == steps:
      validation_loss = float(evaluate(params, *validation))
      curve.append({"step": step, "train": float(evaluate(params, train_means, train_targets)),
                    "validation": validation_loss})
      if validation_loss < best_loss:
        best_params, best_loss = params, validation_loss
  return best_params["params"], curve


def _restore_source(workdir: str | pathlib.Path, out: pathlib.Path
                    ) -> tuple[inference.TrainedModel, int]:
  """The latest checkpoint of `workdir` and its step; `out` must not exist."""
  if out.exists():
    raise FileExistsError(f"{out} exists; remove it first")
  step = checkpoints.checkpoint_manager(workdir, read_only=True).latest_step()
  if step is None:
    raise ValueError(f"no checkpoint in {workdir}")
  return inference.TrainedModel.restore(workdir, step), step


def _write_workdir(source: str | pathlib.Path, out: pathlib.Path, model: inference.TrainedModel,
                   step: int, config: ml_collections.ConfigDict, name: str, head_params: dict,
                   summary: dict, seed: int) -> None:
  """Writes `out`: the source's variables with `head_params` as its `name` head (added or
  replaced), fresh Adam moments, `config`; the source's training record and earlier fits;
  the fit's `summary` as `out/<name>_fit.json`."""
  state = train.create_train_state(config, jax.random.key(seed)).replace(
      step=step, params={**model.variables["params"], name: head_params},
      batch_stats=model.variables["batch_stats"])
  target = checkpoints.checkpoint_manager(out, max_to_keep=1)
  checkpoints.save(target, step, state, config)
  checkpoints.wait_until_written(target)
  for kept in ("metrics.jsonl", "learning_curves.png", "property_fit.json",
               "composition_fit.json"):
    if (pathlib.Path(source) / kept).exists() and kept != f"{name}_fit.json":
      shutil.copy(pathlib.Path(source) / kept, out / kept)
  writing.write_json(out / f"{name}_fit.json", summary)


def fit_property_head(workdir: str | pathlib.Path, out: str | pathlib.Path,
                      names: Sequence[str], *, steps: int = 3000, learning_rate: float = 1e-3,
                      batch_size: int = 256, seed: int = 0, limit: int = 0) -> dict:
  """Writes `out`, a workdir holding `workdir`'s latest checkpoint (same step, fresh Adam
  moments) with a head for the `names` properties of its dataset fitted on its frozen latent
  space (in place of any property head it had); `limit` > 0 takes only the first crystals of
  each split. Returns the fit's summary (also written to `out/property_fit.json`): per
  property the validation MAE and R² beside the training mean's MAE, and the learning curve."""
  out = pathlib.Path(out)
  model, step = _restore_source(workdir, out)
  config = ml_collections.ConfigDict(model.config.to_dict())
  names = tuple(names)
  config.model.properties = names
  train.with_property_scaling(config, datasets.split_source(config.dataset, "train"))

  def values(crystal):
    return crystals.property_values(crystal, names)

  train_split = encode_split(model, "train", values, limit)
  validation_split = encode_split(model, "validation", values, limit)
  head = models.PropertyHead(config.model.property_hidden, config.model.property_means,
                             config.model.property_stds)

  def loss(predicted, target):
    return losses.property_mse(predicted, target, config.model.property_stds)

  head_params, curve = fit_head(head, loss, train_split, validation_split, steps=steps,
                                learning_rate=learning_rate, batch_size=batch_size, seed=seed)
  predicted = np.asarray(head.apply({"params": head_params}, validation_split.means))
  summary = {
      "source": str(workdir), "step": step, "seed": seed, "steps": steps,
      "num_train": int(train_split.means.shape[0]),
      "num_validation": int(validation_split.means.shape[0]),
      "properties": metrics.property_metrics(predicted, validation_split.targets, names,
                                             config.model.property_means),
      "curve": curve,
  }
  _write_workdir(workdir, out, model, step, config, "property", head_params, summary, seed)
  return summary


def fit_composition_head(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                         hidden: Sequence[int] = (512, 512), dropout_rate: float = 0.3,
                         posterior_noise: float = 1.0, members: int = 8, steps: int = 12000,
                         learning_rate: float = 1e-3, batch_size: int = 256, seed: int = 0,
                         limit: int = 0) -> dict:
  """Writes `out`, a workdir holding `workdir`'s latest checkpoint (same step, fresh Adam
  moments) whose composition head is replaced by an ensemble of `members` MLPs of `hidden`
  widths, each fitted alone on the frozen latent space (seeds `seed`, `seed` + 1, ...;
  `dropout_rate`, `posterior_noise`: see the module's docstring); `limit` > 0 takes only the
  first crystals of each split. Returns the fit's summary (also written to
  `out/composition_fit.json`): the fraction of validation crystals whose composition the head
  gets exactly (its fractions rounded to their atom count), before, per member and for the
  ensemble, and each member's curve."""
  out = pathlib.Path(out)
  model, step = _restore_source(workdir, out)
  config = ml_collections.ConfigDict(model.config.to_dict())
  if not config.model.composition_head:
    raise ValueError(f"{workdir} has no composition head: its encoder does not read the "
                     "composition (train it with model.composition_head=True)")
  max_z = config.dataset.max_z

  def counts(crystal):
    return atom_counts(crystal, max_z)

  train_split = encode_split(model, "train", counts, limit)
  validation_split = encode_split(model, "validation", counts, limit)
  source_head = models.CompositionHead(tuple(config.model.composition_hidden), max_z,
                                       members=config.model.composition_members)
  source_logits = source_head.apply({"params": model.variables["params"]["composition"]},
                                    validation_split.means)
  member = models.CompositionHead(tuple(hidden), max_z, dropout_rate)
  fitted, curves, member_exact = [], [], []
  for index in range(members):
    params, curve = fit_head(member, composition_loss, train_split, validation_split,
                             steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                             seed=seed + index, posterior_noise=posterior_noise)
    fitted.append(params)
    curves.append(curve)
    member_exact.append(composition_exact(member.apply({"params": params},
                                                       validation_split.means),
                                          validation_split.targets))
  head_params = (fitted[0] if members == 1 else
                 {"members": jax.tree.map(lambda *stacked: np.stack(stacked), *fitted)})
  head = models.CompositionHead(tuple(hidden), max_z, members=members)
  config.model.composition_hidden = tuple(hidden)
  config.model.composition_members = members
  logits = head.apply({"params": head_params}, validation_split.means)
  summary = {
      "source": str(workdir), "step": step, "seed": seed, "steps": steps,
      "hidden": list(hidden), "dropout_rate": dropout_rate, "posterior_noise": posterior_noise,
      "members": members,
      "num_train": int(train_split.means.shape[0]),
      "num_validation": int(validation_split.means.shape[0]),
      "composition_exact_before": composition_exact(source_logits, validation_split.targets),
      "composition_exact_members": member_exact,
      "composition_exact": composition_exact(logits, validation_split.targets),
      "curves": curves,
  }
  _write_workdir(workdir, out, model, step, config, "composition", head_params, summary, seed)
  return summary
