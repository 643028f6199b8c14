"""A property head fitted to a trained model's frozen latent space.

Joint training (`model.properties` with `loss.property_weight`, train.py) shapes the latent for
the properties as well, at the cost of a full training run. Fitting a head afterwards adds one to
a model already trained (e.g. the shipped `pretrained/perov5_repeat`, whose train step takes
~100 s on a 2-core CPU) in minutes: the crystals of the training and validation splits are
encoded once (latent means, what a joint head reads), and an MLP of the joint head's shape
(`models.PropertyHead`) is fitted with Adam to the properties standardised by the training
split (rows without a value masked), keeping the parameters of the lowest validation error. The
result is a workdir like a jointly trained one, so every mode uses it unchanged (`evaluate`:
MAE and R², `optimize`).
"""

from collections.abc import Sequence
import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
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
from crystal_vae import reconstruction
from crystal_vae import train


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
  """Latent means (N, L) of a split's crystals and their property values (N, P), NaN = none."""
  means: np.ndarray
  values: np.ndarray


def encode_split(model: inference.TrainedModel, split: str, names: Sequence[str],
                 limit: int = 0, batch_size: int = 32) -> EncodedSplit:
  """The latent means of the first `limit` (0: all) crystals of the model's dataset split,
  voxelised as at evaluation, with their named property values."""
  source = datasets.split_source(model.config.dataset, split)
  count = len(source) if limit <= 0 else min(limit, len(source))
  structures = [datasets.record_to_crystal(source[index]) for index in range(count)]
  means, _ = model.encode_crystals(structures, batch_size=batch_size)
  values = np.stack([crystals.property_values(structure, names) for structure in structures])
  return EncodedSplit(means, values)


def _head(config: ml_collections.ConfigDict) -> models.PropertyHead:
  """The property head of `config`'s model, as `models.CrystalVAE` builds it."""
  model = config.model
  return models.PropertyHead(model.property_hidden, model.property_means, model.property_stds)


def fit_head(config: ml_collections.ConfigDict, train_split: EncodedSplit,
             validation_split: EncodedSplit, *, steps: int, learning_rate: float,
             batch_size: int, seed: int, eval_every: int = 50
             ) -> tuple[dict, list[dict[str, float]]]:
  """The parameters of `config`'s property head (`model.property_hidden`, `property_means`,
  `property_stds`) fitted by Adam on minibatches of `train_split`, those of the lowest
  validation error over the evaluations every `eval_every` steps, and the curve of (step,
  train, validation) standardised mean squared errors."""
  head = _head(config)
  init_key, order_key = jax.random.split(jax.random.key(seed))
  params = head.init(init_key, jnp.zeros((1, train_split.means.shape[1]), jnp.float32))
  tx = optax.adam(learning_rate)

  def error(params, means, values):
    return jnp.mean(losses.property_mse(head.apply(params, means), values,
                                        config.model.property_stds))

  @jax.jit
  def step_fn(params, opt_state, means, values):
    loss, grads = jax.value_and_grad(error)(params, means, values)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  evaluate = jax.jit(error)
  train_means, train_values = jnp.asarray(train_split.means), jnp.asarray(train_split.values)
  validation = (jnp.asarray(validation_split.means), jnp.asarray(validation_split.values))
  opt_state, curve = tx.init(params), []
  best_params, best_error = params, float(evaluate(params, *validation))
  count = train_split.means.shape[0]
  for step in range(1, steps + 1):
    rows = jax.random.choice(jax.random.fold_in(order_key, step), count,
                             (min(batch_size, count),), replace=False)
    params, opt_state, _ = step_fn(params, opt_state, train_means[rows], train_values[rows])
    if step % eval_every == 0 or step == steps:
      validation_error = float(evaluate(params, *validation))
      curve.append({"step": step, "train": float(evaluate(params, train_means, train_values)),
                    "validation": validation_error})
      if validation_error < best_error:
        best_params, best_error = params, validation_error
  return best_params["params"], curve


def fit_property_head(workdir: str | pathlib.Path, out: str | pathlib.Path,
                      names: Sequence[str], *, steps: int = 3000, learning_rate: float = 1e-3,
                      batch_size: int = 256, seed: int = 0, limit: int = 0) -> dict:
  """Writes `out`, a workdir holding `workdir`'s latest checkpoint (same step, fresh Adam
  moments) with a head for the `names` properties of its dataset fitted on its frozen latent
  space; `limit` > 0 takes only the first crystals of each split. Returns the fit's summary
  (also written to `out/property_fit.json`): per property the validation MAE and R² beside
  the training mean's MAE, and the learning curve."""
  out = pathlib.Path(out)
  if out.exists():
    raise FileExistsError(f"{out} exists; remove it first")
  step = checkpoints.checkpoint_manager(workdir, read_only=True).latest_step()
  if step is None:
    raise ValueError(f"no checkpoint in {workdir}")
  model = inference.TrainedModel.restore(workdir, step)
  config = ml_collections.ConfigDict(model.config.to_dict())
  if config.model.properties:
    raise ValueError(f"{workdir} already has a property head ({tuple(config.model.properties)})")
  names = tuple(names)
  config.model.properties = names
  train.with_property_scaling(config, datasets.split_source(config.dataset, "train"))
  train_split = encode_split(model, "train", names, limit)
  validation_split = encode_split(model, "validation", names, limit)
  head_params, curve = fit_head(config, train_split, validation_split, steps=steps,
                                learning_rate=learning_rate, batch_size=batch_size, seed=seed)

  # The source's variables unchanged, the fitted head beside them, fresh Adam moments.
  state = train.create_train_state(config, jax.random.key(seed)).replace(
      step=step, params={**model.variables["params"], "property": head_params},
      batch_stats=model.variables["batch_stats"])
  target = checkpoints.checkpoint_manager(out, max_to_keep=1)
  checkpoints.save(target, step, state, config)
  checkpoints.wait_until_written(target)
  for name in ("metrics.jsonl", "learning_curves.png"):  # the source's training record
    if (pathlib.Path(workdir) / name).exists():
      shutil.copy(pathlib.Path(workdir) / name, out / name)

  predicted = np.asarray(_head(config).apply({"params": head_params}, validation_split.means))
  summary = {
      "source": str(workdir), "step": step, "seed": seed, "steps": steps,
      "num_train": int(train_split.means.shape[0]),
      "num_validation": int(validation_split.means.shape[0]),
      "properties": metrics.property_metrics(predicted, validation_split.values, names,
                                             config.model.property_means),
      "curve": curve,
  }
  reconstruction.write_json(out / "property_fit.json", summary)
  return summary
