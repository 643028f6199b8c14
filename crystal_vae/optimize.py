"""`--mode=optimize`: property-guided generation by gradient steps in the latent space.

The model needs a property head (`config.model.properties`, trained jointly). From `num`
starting latents (the latent means of the first crystals of `split`, or prior draws z ~ N(0, 1))
Adam follows the head's gradient for `steps` steps, minimising (or maximising) the standardised
prediction plus `prior_weight` · |z|² / 2, the negative log prior that keeps z where the decoder
was trained. At `num_saved` evenly spaced steps the latents are decoded and rebuilt into crystals
(CDVAE's protocol, scripts/compute_metrics.py `OptEval`):

* each rebuilt crystal is valid when CDVAE counts it valid (`metrics.cdvae_valid`);
* its property is judged by ANOTHER model (`judge`: the workdir of a model with the same property
  head that shares no weights with the optimised one, e.g. trained with another seed or in the
  other representation): the rebuilt crystal is voxelised, encoded by the judge and read by the
  judge's head; no judge, or one that is or shares weights with the optimised model, is refused;
* a latent stops once the head's prediction passes the training values' range, so the search
  stays where the head and the judge have seen crystals;
* SR5 / SR10 / SR15: the fraction of starts whose best judged value over the saved steps (valid
  crystals only) lies in the best 5 / 10 / 15% of the training split's values.

Writes `cifs/step_XXXX/start_YY.cif` (+ `invalid.csv`), `trajectory.png` (head prediction along
each path, judged values at the saved steps, the training percentiles), `gallery.png` (the
last step's decodings) and `summary.json`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import logging
import ml_collections
import jax
import numpy as np
import optax

from crystal_vae import crystals
from crystal_vae import generation
from crystal_vae import inference
from crystal_vae import latent_prior
from crystal_vae import metrics
from crystal_vae import plots
from crystal_vae import progress
from crystal_vae import writing

DIRECTIONS = ("minimize", "maximize")
STARTS = ("encoded", "prior")
SUCCESS_PERCENTILES = (5, 10, 15)


def property_index(model: inference.TrainedModel, name: str) -> int:
  """The position of property `name` ("" = the first) in the model's property head."""
  names = tuple(model.config.model.properties)
  if not names:
    raise inference.SettingsError("the model has no property head: train it with"
                     " --config.model.properties=\"('<column>',)\"")
  if not name:
    return 0
  if name not in names:
    raise inference.SettingsError(f"the model's property head predicts {names}, not {name!r}")
  return names.index(name)


def independent_judge(model: inference.TrainedModel, judge: str) -> inference.TrainedModel:
  """The judge restored from workdir `judge`; refused (one line) when there is none, or when it
  is the optimised model or shares any weight array with it (a head fitted on the same frozen
  encoder, a model fine-tuned from it): such a judge grades the optimiser's own extrapolation."""
  if not judge:
    raise inference.SettingsError(
        "optimize needs an independent judge: --config.optimize.judge=WORKDIR of a model with"
        " the same property head that shares no weights with this one (the recipe trained with"
        " another --config.seed, or the other representation's model)")
  if model.workdir is not None and pathlib.Path(judge).resolve() == model.workdir.resolve():
    raise inference.SettingsError(
        f"the judge {judge} is the optimised model itself: give an independently trained one")
  judging = inference.TrainedModel.restore(judge)
  ours = dict(_flat_arrays(model.variables))
  shared = [path for path, value in _flat_arrays(judging.variables)
            if path in ours and ours[path].shape == value.shape
            and np.array_equal(ours[path], value)]
  if shared:
    raise inference.SettingsError(
        f"the judge {judge} shares {len(shared)} weight arrays with the optimised model (e.g."
        f" {shared[0]}): it is not independent; give a model trained on its own")
  return judging


def _flat_arrays(variables) -> list[tuple[str, np.ndarray]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
  return [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in leaves]


def optimise_latents(model: inference.TrainedModel, z: np.ndarray, index: int, *,
                     direction: str, steps: int, learning_rate: float, prior_weight: float,
                     bounds: tuple[float, float] = (-np.inf, np.inf)
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Adam on the latents: returns the path (steps + 1, N, L) and the head's prediction along
  it (steps + 1, N). A latent whose prediction has passed `bounds` (the training values' range)
  on the side it is pushed towards stays where it is: the search keeps to where the head (and a
  judge) has seen crystals."""
  if direction not in DIRECTIONS:
    raise inference.SettingsError(f"direction {direction!r} not in {DIRECTIONS}")
  sign = 1.0 if direction == "minimize" else -1.0
  scale = model.config.model.property_stds[index]
  optimiser = optax.adam(learning_rate)
  z = np.asarray(z, np.float32)
  state = optimiser.init(z)
  path, predictions = [z], []
  counter = progress.Progress("optimize:", steps, unit="steps")
  for step in range(steps + 1):
    values, gradient = model.property_gradient(z, index)
    if step:
      counter.advance()
    predictions.append(values[:, index])
    if step == steps:
      break
    updates, state = optimiser.update(sign * gradient / scale + prior_weight * z, state)
    beyond = values[:, index] <= bounds[0] if sign > 0 else values[:, index] >= bounds[1]
    updates = np.where(beyond[:, None], 0.0, updates)
    z = np.asarray(optax.apply_updates(z, updates), np.float32)
    path.append(z)
  return np.stack(path), np.stack(predictions)


def saved_steps(steps: int, num_saved: int) -> list[int]:
  """`num_saved` evenly spaced steps ending at `steps` (CDVAE saves after each interval)."""
  return sorted({int(round(step)) for step in np.linspace(steps / num_saved, steps, num_saved)})


def judged_properties(judge: inference.TrainedModel, structures: Sequence, index: int
                      ) -> np.ndarray:
  """The judge's prediction for each crystal (NaN where there is none or the judge's grid cannot
  hold it), from its latent mean."""
  limits = crystals.CrystalLimits(box=judge.config.dataset.box, max_z=judge.config.dataset.max_z,
                                  max_atoms=judge.config.dataset.max_atoms)
  values = np.full(len(structures), np.nan)
  accepted, positions = [], []
  for position, structure in enumerate(structures):
    if structure is None:
      continue
    try:
      accepted.append(crystals.crystal_from_structure(structure, f"judged_{position}", limits))
      positions.append(position)
    except crystals.RejectedCrystal:
      continue
  if accepted:
    means, _ = judge.encode_crystals(accepted)
    values[positions] = judge.predict_properties(means)[:, index]
  return values


def success_rates(best: np.ndarray, training_values: np.ndarray, direction: str
                  ) -> dict[str, float]:
  """SR5/10/15: the fraction of `best` (one per start, NaN = no valid crystal) within the best
  5/10/15% of the training values, and the thresholds used."""
  results = {}
  for percent in SUCCESS_PERCENTILES:
    if direction == "minimize":
      threshold = float(np.percentile(training_values, percent))
      hits = np.nan_to_num(best, nan=np.inf) <= threshold
    else:
      threshold = float(np.percentile(training_values, 100 - percent))
      hits = np.nan_to_num(best, nan=-np.inf) >= threshold
    results[f"sr{percent}"] = float(np.mean(hits)) if best.size else float("nan")
    results[f"threshold_{percent}"] = threshold
  return results


def _starting_latents(model: inference.TrainedModel, settings: ml_collections.ConfigDict
                      ) -> tuple[np.ndarray, list[str]]:
  if settings.start == "prior":
    z = latent_prior.GaussianPrior.standard(model.config.model.latent_dim).sample(
        settings.num, settings.seed)
    return z, [f"prior_{index}" for index in range(settings.num)]
  if settings.start != "encoded":
    raise inference.SettingsError(f"optimize.start {settings.start!r} not in {STARTS}")
  starts = generation.split_crystals(model.config, settings.split, settings.num)
  z, _ = model.encode_crystals(starts)
  return z, [crystal.id for crystal in starts]


def optimize(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
             out_dir: pathlib.Path) -> dict:
  """`--mode=optimize`: see the module docstring."""
  if model.config.model.conditional:
    raise inference.SettingsError(
        "optimize decodes without a condition: use an unconditional model")
  index = property_index(model, settings.property)
  name = model.config.model.properties[index]
  judge = independent_judge(model, settings.judge)
  judge_index = property_index(judge, name)
  training = generation.split_crystals(model.config, "train", -1)
  training_values = np.array([crystal.properties.get(name, np.nan) for crystal in training])
  training_values = training_values[np.isfinite(training_values)]
  z, start_ids = _starting_latents(model, settings)
  bounds = ((float(training_values.min()), float(training_values.max()))
            if training_values.size else (-np.inf, np.inf))
  path, predictions = optimise_latents(
      model, z, index, direction=settings.direction, steps=settings.steps,
      learning_rate=settings.learning_rate, prior_weight=settings.prior_weight, bounds=bounds)

  steps = saved_steps(settings.steps, settings.num_saved)
  judged = np.full((len(steps), len(z)), np.nan)
  valid = np.zeros((len(steps), len(z)), bool)
  last_grids, last_rebuilt = None, None
  for row, step in enumerate(steps):
    grids = model.decode(path[step], batch_size=settings.batch_size)
    rebuilt = model.to_crystals(grids)
    writing.write_cifs(rebuilt, [f"start_{i:02d}" for i in range(len(z))],
                              out_dir / "cifs" / f"step_{step:04d}")
    structures = [r.structure if r.valid and metrics.cdvae_valid(r.structure) else None
                  for r in rebuilt]
    valid[row] = [s is not None for s in structures]
    judged[row] = judged_properties(judge, structures, judge_index)
    last_grids, last_rebuilt = grids, rebuilt
    logging.info("step %d: %d of %d valid", step, valid[row].sum(), len(z))

  with np.errstate(all="ignore"):
    pick = np.nanmin if settings.direction == "minimize" else np.nanmax
    best = (pick(np.where(valid, judged, np.nan), axis=0) if valid.any(axis=0).any()
            else np.full(len(z), np.nan))
  results = {
      "property": name, "direction": settings.direction, "start": settings.start,
      "num": len(z), "steps": settings.steps, "saved_steps": steps,
      "judge": settings.judge, "training_range": list(bounds),
      **success_rates(best, training_values, settings.direction),
      "valid_fraction_per_saved_step": valid.mean(axis=1).tolist(),
      "head_prediction_start_mean": float(predictions[0].mean()),
      "head_prediction_end_mean": float(predictions[-1].mean()),
      "judged_end_mean": float(np.nanmean(judged[-1])) if valid[-1].any() else float("nan"),
      "training_mean": float(training_values.mean()) if training_values.size else float("nan"),
      "start_ids": start_ids,
  }
  out_dir.mkdir(parents=True, exist_ok=True)
  plots.plot_optimisation(predictions, steps, judged, valid, training_values, name,
                          out_dir / "trajectory.png")
  shown = min(16, len(z))
  plots.plot_gallery({"density": last_grids["density"][:shown],
                      "species": model.species_to_show(last_grids, last_rebuilt)[:shown]},
                     [generation.label(r) for r in last_rebuilt[:shown]], model.spec,
                     out_dir / "gallery.png",
                     f"after {steps[-1]} steps ({settings.direction} {name})")
  writing.write_json(out_dir / "summary.json", results)
  print(f"Optimised {len(z)} latents for {settings.steps} steps ({settings.direction} {name});"
        f" written to {out_dir}")
  print(f"  head prediction: {results['head_prediction_start_mean']:.4g} ->"
        f" {results['head_prediction_end_mean']:.4g}"
        f" (training mean {results['training_mean']:.4g})")
  print(f"  SR5 {results['sr5']:.3f}  SR10 {results['sr10']:.3f}  SR15 {results['sr15']:.3f}"
        f"  (judge: {results['judge']})")
  print(f"  valid (CDVAE) at the saved steps: {results['valid_fraction_per_saved_step']}")
  return results
