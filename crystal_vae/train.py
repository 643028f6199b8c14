"""Training and evaluation of the β-VAE + attention U-Net (paper §3), data parallel with `jax.jit`.

The batch of padded crystals is voxelised on the devices by a jitted function just before the
step; `train_step(state, batch, rng)` is pure and derives its reparameterisation key from
`fold_in(rng, step)`, so a resumed run repeats an uninterrupted one exactly.
"""

import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from flax import traverse_util
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from crystal_vae import adam
from crystal_vae import checkpoints
from crystal_vae import config_checks
from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae import input_pipeline
from crystal_vae import learning_curves
from crystal_vae import losses
from crystal_vae import metric_writer
from crystal_vae import models
from crystal_vae import voxelize

Batch = Mapping[str, jax.Array]
DATA_AXIS = "data"


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over `config.num_devices` devices (-1: every device of every host)."""
  devices = jax.devices()
  if config.num_devices != -1 and jax.process_count() > 1:
    raise ValueError("num_devices must be -1 (all devices) when running on several hosts")
  count = len(devices) if config.num_devices == -1 else config.num_devices
  return jax.make_mesh((count,), (DATA_AXIS,), devices=devices[:count],
                       axis_types=(jax.sharding.AxisType.Auto,))


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  """Initialises the model's variables and the Adam optimiser."""
  variables = models.init_variables(config, rng)
  return TrainState.create(apply_fn=models.model_from_config(config).apply,
                           params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           tx=adam.optimizer(config))


def initialised_from(state: TrainState, workdir: str) -> TrainState:
  """`state` with the parameters and batch statistics it shares (same path and shape) with the
  latest checkpoint in `workdir`; the others keep their initial values."""
  manager = checkpoints.checkpoint_manager(workdir, read_only=True)
  saved_config = checkpoints.restore_config(manager)
  sharding = jax.tree.leaves(state.params)[0].sharding  # replicated like the state
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(lambda: models.init_variables(saved_config, jax.random.key(0))))
  _, saved = checkpoints.restore_variables(manager, abstract)
  kept = []

  def take(path, initial, saved_values):
    value = saved_values.get(path)
    if value is None or value.shape != initial.shape:
      return initial
    kept.append(path)
    return value

  variables = {}
  for name in ("params", "batch_stats"):
    saved_values = dict(traverse_util.flatten_dict(saved[name]))
    flat = traverse_util.flatten_dict(getattr(state, name))
    variables[name] = traverse_util.unflatten_dict(
        {path: take(path, value, saved_values) for path, value in flat.items()})
  total = len(jax.tree.leaves(state.params)) + len(jax.tree.leaves(state.batch_stats))
  logging.info("Initialised %d of %d variables from %s", len(kept), total, manager.directory)
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def voxel_losses(outputs: Mapping[str, jax.Array], batch: Batch,
                 config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Per-example loss terms and accuracies, shape (B,) each."""
  density, species = batch["density"], batch["species"]
  voxel_axes = tuple(range(1, density.ndim))
  mse = jnp.mean((outputs["recon"] - density) ** 2, axis=voxel_axes)
  mean, logvar = outputs["mean"], outputs["logvar"]
  kl = 0.5 * jnp.sum(jnp.exp(logvar) + mean ** 2 - 1.0 - logvar, axis=-1)
  model, loss = config.model, config.loss
  terms = {"mse": mse, "kl": kl}
  z_error = losses.site_z_error(outputs["recon"], density, box=config.voxel.box,
                                sigma=config.voxel.sigma)
  terms["site_z_mse"], terms["site_z_right"] = losses.site_z_loss(z_error, species)
  if "segmented" in outputs:  # model.segmenter
    species_loss = functools.partial(losses.species_loss, species=species,
                                     species_head=model.species_head, balanced=loss.balanced,
                                     z_weight=loss.z_weight)
    predicted = models.species_grid(outputs["segmented"], model.species_head,
                                    config.dataset.max_z)
    correct = predicted == species
    atom_voxels = species > 0
    terms.update({
        "seg": species_loss(outputs["segmented"]),
        "voxel_accuracy": jnp.mean(correct, axis=voxel_axes),
        "atom_voxel_correct": jnp.sum(correct & atom_voxels, axis=voxel_axes),
        "atom_voxel_found": jnp.sum((predicted > 0) & atom_voxels, axis=voxel_axes),
        "atom_voxels": jnp.sum(atom_voxels, axis=voxel_axes),
        "empty_voxel_accuracy": jnp.sum((predicted == 0) & ~atom_voxels, axis=voxel_axes)
                                / jnp.maximum(jnp.sum(~atom_voxels, axis=voxel_axes), 1),
    })
  if "segmented_true" in outputs:
    terms["seg_true"] = species_loss(outputs["segmented_true"])
  if "lattice" in outputs:
    # The lattice as placed in the cube: rows rotated like the atoms (cube = R @ cartesian + o).
    target = jnp.einsum("bij,bkj->bik", batch["lattice"], batch["rotation"])
    terms["lattice_mse"] = losses.lattice_mse(outputs["lattice"], target, config.voxel.box)
  if "properties" in outputs:
    terms["property_mse"] = losses.property_mse(outputs["properties"], batch["properties"],
                                                config.model.property_stds)
  if "composition" in outputs:
    atomic_numbers, atom_mask = batch["atomic_numbers"], batch["atom_mask"]
    terms["composition_ce"] = losses.composition_cross_entropy(
        outputs["composition"], atomic_numbers, atom_mask)
    terms["composition_exact"] = losses.composition_exact(outputs["composition"], atomic_numbers,
                                                          atom_mask)
  return terms


def total_loss(terms: Mapping[str, jax.Array], config: ml_collections.ConfigDict) -> jax.Array:
  """MSE + β·KL + SEG (+ teacher forcing, site Z, lattice, composition, properties): with the
  U-Net's input gradient scaled by γ this is L_VAE for the encoder/decoder and L_UNet for the
  U-Net (paper §3); SEG is the species head's loss (the paper's CE for "classes"), absent
  without a segmenter."""
  loss = (terms["mse"] + config.loss.beta * terms["kl"]
          + config.loss.site_z_weight * terms["site_z_mse"])
  if "seg" in terms:
    loss = loss + terms["seg"]
  if "seg_true" in terms:
    loss = loss + config.loss.teacher_forcing * terms["seg_true"]
  if "lattice_mse" in terms:
    loss = loss + config.loss.lattice_weight * terms["lattice_mse"]
  if "composition_ce" in terms:
    loss = loss + config.loss.composition_weight * terms["composition_ce"]
  if "property_mse" in terms:
    loss = loss + config.loss.property_weight * terms["property_mse"]
  return jnp.mean(loss)


# Per-example voxel counts, summed over the batch (not averaged) into the two atom-voxel rates.
_ATOM_COUNTS = ("atom_voxel_correct", "atom_voxel_found", "atom_voxels")


def summarise(terms: Mapping[str, jax.Array], config: ml_collections.ConfigDict
              ) -> dict[str, jax.Array]:
  """Batch means of the per-example terms plus the paper's two losses."""
  metrics = {key: jnp.mean(value) for key, value in terms.items() if key not in _ATOM_COUNTS}
  return with_paper_losses(
      {**metrics, **atom_voxel_rates({key: jnp.sum(terms[key]) for key in _ATOM_COUNTS
                                      if key in terms})}, config)


def atom_voxel_rates(counts: Mapping[str, Any]) -> dict[str, Any]:
  """The fractions of atom voxels the segmenter marks as atoms and gives the right species, from
  summed `_ATOM_COUNTS` (none without a segmenter)."""
  if "atom_voxels" not in counts:
    return {}
  atom_voxels = jnp.maximum(counts["atom_voxels"], 1)
  return {"atom_voxel_accuracy": counts["atom_voxel_correct"] / atom_voxels,
          "atom_voxel_recall": counts["atom_voxel_found"] / atom_voxels}


def with_paper_losses(metrics: dict[str, Any], config: ml_collections.ConfigDict
                      ) -> dict[str, Any]:
  """Adds the paper's L_VAE = MSE + β·KL + γ·CE and L_UNet = CE (the CE where there is one)."""
  metrics["loss_vae"] = metrics["mse"] + config.loss.beta * metrics["kl"]
  if "seg" in metrics:
    metrics["loss_vae"] = metrics["loss_vae"] + config.loss.gamma * metrics["seg"]
    metrics["loss_unet"] = metrics["seg"]
  return metrics


def condition_of(batch: Batch, config: ml_collections.ConfigDict) -> jax.Array | None:
  """The conditional VAE's per-sample scale: the maximum of the true density."""
  if not config.model.conditional:
    return None
  return jnp.max(batch["density"], axis=(1, 2, 3))


def composition_of(batch: Batch, config: ml_collections.ConfigDict) -> jax.Array | None:
  """The encoder's composition input: each crystal's fraction of atoms per Z (with a head)."""
  if not config.model.composition_head:
    return None
  return losses.composition_fractions(batch["atomic_numbers"], batch["atom_mask"],
                                      config.dataset.max_z + 1)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on a voxelised batch; pure, so it is jitted over the device mesh."""
  sample_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    outputs, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["density"], sample_rng,
        train=True, unet_grad_scale=config.loss.gamma, condition=condition_of(batch, config),
        composition=composition_of(batch, config),
        teacher_forcing=config.loss.teacher_forcing > 0, mutable=["batch_stats"])
    terms = voxel_losses(outputs, batch, config)
    return total_loss(terms, config), (terms, updates["batch_stats"])

  (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, grad_norm = adam.apply_gradients(state, grads, batch_stats, config)
  metrics = summarise(terms, config)
  metrics["loss"] = loss
  metrics["grad_norm"] = grad_norm
  metrics["learning_rate"] = adam.learning_rate_schedule(config)(state.step - 1)
  return state, metrics


def eval_step(state: TrainState, batch: Batch, *, config: ml_collections.ConfigDict
              ) -> dict[str, jax.Array]:
  """Sums of the per-example terms over the valid rows, reconstructing from the latent mean."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  condition = condition_of(batch, config)

  def reconstruct(model, density):
    mean, logvar = model.encode(density, train=False, condition=condition,
                                composition=composition_of(batch, config))
    recon = model.decode(mean, train=False, condition=condition)
    outputs = {"mean": mean, "logvar": logvar, "recon": recon}
    if config.model.segmenter:
      outputs["segmented"] = model.segment(recon, train=False)
    if config.model.lattice_head:
      outputs["lattice"] = model.predict_lattice(mean)
    if config.model.composition_head:
      outputs["composition"] = model.predict_composition(mean)
    if config.model.properties:
      outputs["properties"] = model.predict_properties(mean)
    return outputs

  outputs = state.apply_fn(variables, batch["density"], method=reconstruct)
  terms = voxel_losses(outputs, batch, config)
  valid = batch["valid"].astype(jnp.float32)
  sums = {key: jnp.sum(value * valid) for key, value in terms.items()}
  sums["count"] = jnp.sum(valid)
  return sums


def num_images_for(lattice: np.ndarray, config: ml_collections.ConfigDict,
                   train: bool) -> tuple[int, int, int]:
  """The batch's static image counts (`voxelize.num_images_for`), equal on every host."""
  counts = np.array(voxelize.num_images_for(lattice, voxelize.GridSpec.from_config(config.voxel),
                                            config.representation, train and config.voxel.rotate))
  if jax.process_count() > 1:
    counts = multihost_utils.process_allgather(counts).reshape(-1, 3).max(axis=0)
  return tuple(int(count) for count in counts)


class Trainer:
  """Holds the jitted, mesh-sharded functions for one config."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    self.batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
    self.replicated = jax.NamedSharding(mesh, jax.P())
    self.spec = voxelize.GridSpec.from_config(config.voxel)
    self.train_step = jax.jit(functools.partial(train_step, config=config), donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(eval_step, config=config))

  def shard(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Per-process numpy arrays -> global arrays split over the `data` axis."""
    return {key: jax.make_array_from_process_local_data(self.batch_sharding, value)
            for key, value in local_batch.items() if key in ("lattice", "frac_coords",
                                                           "atomic_numbers", "atom_mask",
                                                           "valid", "properties")}

  def voxelized(self, local_batch: Mapping[str, np.ndarray], key: jax.Array, *,
                train: bool) -> dict[str, jax.Array]:
    """Shards the batch and adds `density` and `species` computed on its devices. Training draws
    random placements (as configured); evaluation is unrotated and, for repeat, at the origin."""
    batch = self.shard(local_batch)
    grids = voxelize.voxelize_batch(
        batch, key, spec=self.spec, representation=self.config.representation,
        rotate=train and self.config.voxel.rotate,
        random_offset=train and self.config.voxel.random_offset,
        num_images=num_images_for(local_batch["lattice"], self.config, train))
    batch.update(density=grids["density"], species=grids["species"], rotation=grids["rotation"])
    return batch

  def evaluate(self, state: TrainState, source: Any, seed: int) -> dict[str, float]:
    """Metrics over (a prefix of) `source`, with a fixed placement key."""
    config = self.config
    local_batch_size = config.eval.batch_size // jax.process_count()
    totals: dict[str, float] = {}
    for index, local_batch in enumerate(input_pipeline.eval_batches(
        source, batch_size=local_batch_size, max_atoms=config.dataset.max_atoms,
        properties=config.model.properties)):
      if index == config.eval.num_batches:
        break
      key = jax.random.fold_in(jax.random.key(seed), index)
      sums = jax.device_get(self.eval_step(state, self.voxelized(local_batch, key, train=False)))
      for name, value in sums.items():
        totals[name] = totals.get(name, 0.0) + float(value)
    count = max(totals.pop("count", 0.0), 1.0)
    metrics = {name: value / count for name, value in totals.items() if name not in _ATOM_COUNTS}
    rates = {name: float(value) for name, value in atom_voxel_rates(totals).items()}
    return with_paper_losses({**metrics, **rates}, config)


def _check_finite(pending: list[tuple[int, dict[str, jax.Array]]], last_good: int | None) -> None:
  """Raises if a step since the last check had a non-finite loss or gradient."""
  for step, metrics in pending:
    loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      raise FloatingPointError(
          f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; training"
          f" stopped. The last good checkpoint (step {last_good}) is left intact: lower the"
          " learning rate or check the data.")


def replicated(tree: Any, sharding: jax.sharding.NamedSharding) -> Any:
  """A pytree of this process's arrays (the same values on every process) as global arrays
  replicated over `sharding`'s mesh, whose devices may belong to other processes."""
  def put(value):
    value = value if isinstance(value, jax.Array) else np.asarray(value)
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(value)),
                                      impl=jax.random.key_impl(value))
    return jax.make_array_from_process_local_data(sharding, np.asarray(jax.device_get(value)))
  return jax.tree.map(put, tree)


def with_property_scaling(config: ml_collections.ConfigDict, train_source: Sequence[Any]
                          ) -> None:
  """Sets `config.model.property_means` / `property_stds` (if not set) to the mean and standard
  deviation of each of `config.model.properties` over the training split, missing values left
  out; they are saved with the checkpoints, so the trained head predicts in the data's units."""
  names = tuple(config.model.properties)
  if not names or len(config.model.property_means) == len(names):
    return
  values = np.stack([crystals.property_values(train_source[index], names)
                     for index in range(len(train_source))])
  counts = np.sum(np.isfinite(values), axis=0)
  if not counts.all():
    missing = [name for name, count in zip(names, counts) if not count]
    raise ValueError(f"no training crystal of dataset {config.dataset.name!r} has a value of "
                     f"{missing}; its properties: "
                     f"{sorted(datasets.record_to_crystal(train_source[0]).properties)}")
  stds = np.nanstd(values, axis=0)
  config.model.property_means = tuple(float(x) for x in np.nanmean(values, axis=0))
  config.model.property_stds = tuple(float(x) if x > 0 else 1.0 for x in stds)
  logging.info("properties %s: training mean %s, std %s (%s values)", names,
               config.model.property_means, config.model.property_stds, counts.tolist())


# learning_curves.png is redrawn at a checkpoint when this long has passed since the last drawing
# (a drawing takes 1-2 s on 2 CPU cores), and at the last step.
_REDRAW_SECONDS = 60.0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains for `config.num_train_steps`, resuming from the latest checkpoint in `workdir`; a
  setting out of range or a workdir that cannot be one is refused first (`config_checks`)."""
  config_checks.check_config(config)
  workdir = config_checks.check_workdir(workdir)
  mesh = create_mesh(config)
  train_source = datasets.split_source(config.dataset, "train")
  with_property_scaling(config, train_source)
  # eval.split "" or "none" turns periodic evaluation off; any other missing split is an error.
  eval_source = (None if config.eval.split in ("", "none")
                 else datasets.split_source(config.dataset, config.eval.split))

  trainer = Trainer(config, mesh)
  manager = checkpoints.checkpoint_manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
  rng = jax.random.key(config.seed)
  init_rng, step_rng, placement_rng = jax.random.split(rng, 3)
  with jax.set_mesh(mesh):
    state = replicated(create_train_state(config, init_rng), trainer.replicated)
    if manager.latest_step() is not None:
      step, state = checkpoints.restore_state(manager, state)
      checkpoints.set_aside_newer(manager, step)
      logging.info("Resumed from step %d in %s", step, manager.directory)
    elif config.init_from:
      state = initialised_from(state, config.init_from)
    start_step = int(state.step)
    step_rng = replicated(step_rng, trainer.replicated)

    writer = metric_writer.MetricWriter(workdir, start_step)
    batches = input_pipeline.train_batches(
        train_source, batch_size=config.batch_size // jax.process_count(),
        max_atoms=config.dataset.max_atoms, seed=config.seed, start_step=start_step,
        properties=config.model.properties)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_good = manager.latest_step()
    timer_step, timer_start = start_step, time.time()
    last_drawn = time.time()
    try:
      for step in range(start_step + 1, config.num_train_steps + 1):
        local_batch = next(batches)
        batch = trainer.voxelized(local_batch, jax.random.fold_in(placement_rng, step), train=True)
        state, metrics = trainer.train_step(state, batch, step_rng)
        pending.append((step, metrics))
        is_last = step == config.num_train_steps
        if step % config.log_every_steps == 0 or is_last:
          _check_finite(pending, last_good)
          means = {key: float(np.mean([jax.device_get(m[key]) for _, m in pending]))
                   for key in pending[-1][1]}
          pending = []
          steps_per_second = (step - timer_step) / (time.time() - timer_start)
          timer_step, timer_start = step, time.time()
          eta = (config.num_train_steps - step) / max(steps_per_second, 1e-9)
          writer.write(step, "train", {**means, "steps_per_second": steps_per_second})
          segmented = (f"  seg {means['seg']:.4f}  atom voxels: found"
                       f" {means['atom_voxel_recall']:.3f}, species right"
                       f" {means['atom_voxel_accuracy']:.3f}" if "seg" in means else "")
          logging.info("step %d/%d  loss %.5f  mse %.5f  kl %.2f%s  site Z within 0.5 %.3f"
                       "  %.2f steps/s  ETA %s", step, config.num_train_steps, means["loss"],
                       means["mse"], means["kl"], segmented, means["site_z_right"],
                       steps_per_second, _format_seconds(eta))
          if "composition_ce" in means:
            logging.info("  composition: cross-entropy %.4f, exact %.3f", means["composition_ce"],
                         means["composition_exact"])
        if eval_source is not None and (step % config.eval_every_steps == 0 or is_last):
          eval_metrics = trainer.evaluate(state, eval_source, seed=config.seed)
          writer.write(step, config.eval.split, eval_metrics)
          logging.info("eval %s at step %d: %s", config.eval.split, step,
                       "  ".join(f"{k} {v:.4g}" for k, v in sorted(eval_metrics.items())))
        if step % config.checkpoint_every_steps == 0 or is_last:
          _check_finite(pending, last_good)
          checkpoints.save(manager, step, state, config)
          last_good = step
          if jax.process_index() == 0 and (is_last
                                           or time.time() - last_drawn >= _REDRAW_SECONDS):
            learning_curves.draw(workdir)
            last_drawn = time.time()
    finally:  # an interrupted run still finishes writing its last checkpoint
      checkpoints.wait_until_written(manager)
      writer.close()
  return state


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
