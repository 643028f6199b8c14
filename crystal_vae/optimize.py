"""`--mode=optimize`: property-guided generation, judged by another model.

The model needs a property head (`config.model.properties`, trained jointly or fitted on its
frozen latent). Two methods (`method`):

* "gradient", CDVAE's protocol (scripts/compute_metrics.py `OptEval`): from `num` starting
  latents (the latent means of the first crystals of `split`, or prior draws z ~ N(0, 1)) Adam
  follows the head's gradient for `steps` steps, minimising (or maximising) the standardised
  prediction plus `prior_weight` · |z|² / 2; a latent stops once the head's prediction passes the
  training values' range, so the search stays where the head and the judge have seen crystals. At
  `num_saved` evenly spaced steps the latents are decoded and rebuilt; SR5 / SR10 / SR15 are the
  fractions of starts whose best judged value over the saved steps (valid crystals only) lies in
  the best 5 / 10 / 15% of the training split's values.
* "screen": `screen_draws` latents of the model's own prior (`sample.prior`, the learned one by
  default, so the draws stay where the model has seen crystals), the `screen_rebuilt` that the head
  ranks best decoded and rebuilt, each rebuilt crystal read again by the model itself (what the
  crystal is, rather than what its latent promised), the best `num` kept; SR5 / SR10 / SR15 are
  the fractions of the `num` whose judged value lies in the best 5 / 10 / 15%. Uniqueness and
  novelty against the training crystals show whether it found new crystals or known ones.

Either way each rebuilt crystal is valid when CDVAE counts it valid (`metrics.cdvae_valid`), and
its property is judged by ANOTHER model (`judge`: the workdir of a model with the same property
head that shares no weights with the optimised one, e.g. trained with another seed or in the
other representation), which reads the crystal in the pose it knows best (`read_properties`); no
judge, or one that is or shares weights with the optimised model, is refused.

Writes `cifs/step_XXXX/start_YY.cif` (+ `invalid.csv`) and `trajectory.png` (head prediction
along each path, judged values at the saved steps, the training percentiles), or
`cifs/screened/rank_XX.cif` and `screening.png` (the model's reading against the judge's);
`gallery.png` and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

from absl import logging
import ml_collections
import jax
import numpy as np
import optax

from crystal_vae import generation
from crystal_vae import generation_metrics
from crystal_vae import inference
from crystal_vae import latent_prior
from crystal_vae import metrics
from crystal_vae import plots
from crystal_vae import poses
from crystal_vae import progress
from crystal_vae import writing

DIRECTIONS = ("minimize", "maximize")
METHODS = ("gradient", "screen")
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


def read_properties(model: inference.TrainedModel, structures: Sequence, index: int
                    ) -> np.ndarray:
  """A model's prediction of property `index` for each crystal (NaN where there is none or the
  model's grid cannot hold it), from its latent mean in the pose the model knows best
  (`poses.best_pose_means`: a rebuilt crystal is often described in another setting than the
  model's training crystals)."""
  means = poses.best_pose_means(model, structures)
  values = np.full(len(structures), np.nan)
  read = ~np.isnan(means).any(axis=1)
  if read.any():
    values[read] = model.predict_properties(means[read])[:, index]
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


@dataclasses.dataclass(frozen=True)
class _Target:
  """What an optimisation pursues and who judges it."""
  index: int  # the property's place in the optimised model's head
  name: str
  judge: inference.TrainedModel
  judge_index: int
  training: list  # the training split's crystals
  training_values: np.ndarray  # their property values (finite ones)
  bounds: tuple[float, float]  # the training values' range


def optimize(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
             out_dir: pathlib.Path) -> dict:
  """`--mode=optimize`: see the module docstring."""
  if model.config.model.conditional:
    raise inference.SettingsError(
        "optimize decodes without a condition: use an unconditional model")
  if settings.method not in METHODS:
    raise inference.SettingsError(f"optimize.method {settings.method!r} not in {METHODS}")
  index = property_index(model, settings.property)
  name = model.config.model.properties[index]
  judge = independent_judge(model, settings.judge)
  training = generation.split_crystals(model.config, "train", -1)
  training_values = np.array([crystal.properties.get(name, np.nan) for crystal in training])
  training_values = training_values[np.isfinite(training_values)]
  bounds = ((float(training_values.min()), float(training_values.max()))
            if training_values.size else (-np.inf, np.inf))
  target = _Target(index, name, judge, property_index(judge, name), training, training_values,
                   bounds)
  run = by_gradient if settings.method == "gradient" else by_screening
  return run(model, settings, target, out_dir)


def by_gradient(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
                target: _Target, out_dir: pathlib.Path) -> dict:
  """CDVAE's protocol: Adam from each start, rebuilt and judged at the saved steps."""
  index, name, bounds = target.index, target.name, target.bounds
  judge, judge_index, training_values = target.judge, target.judge_index, target.training_values
  z, start_ids = _starting_latents(model, settings)
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
    judged[row] = read_properties(judge, structures, judge_index)
    last_grids, last_rebuilt = grids, rebuilt
    logging.info("step %d: %d of %d valid", step, valid[row].sum(), len(z))

  with np.errstate(all="ignore"):
    pick = np.nanmin if settings.direction == "minimize" else np.nanmax
    best = (pick(np.where(valid, judged, np.nan), axis=0) if valid.any(axis=0).any()
            else np.full(len(z), np.nan))
  results = {
      "method": "gradient", "property": name, "direction": settings.direction,
      "start": settings.start,
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


def ranked_draws(model: inference.TrainedModel, num_draws: int, num_kept: int, seed: int,
                 index: int, direction: str, bounds: tuple[float, float]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """`num_draws` latents of the model's own prior (`sample.prior`, fitted or restored as
  `--mode=sample` does), the `num_kept` the head predicts best (lowest, or highest) among those
  it predicts within `bounds`, best first, and those predictions."""
  if direction not in DIRECTIONS:
    raise inference.SettingsError(f"direction {direction!r} not in {DIRECTIONS}")
  prior, _ = generation.prior_of(model, model.config.sample)
  z = prior.sample(num_draws, seed)
  predicted = model.predict_properties(z)[:, index]
  sign = 1.0 if direction == "minimize" else -1.0
  inside = (predicted >= bounds[0]) & (predicted <= bounds[1])
  order = np.argsort(np.where(inside, sign * predicted, np.inf), kind="stable")
  order = order[:min(num_kept, int(inside.sum()))]
  return z[order], predicted[order]


def by_screening(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
                 target: _Target, out_dir: pathlib.Path) -> dict:
  """Draw `screen_draws` latents from the model's prior, rebuild the `screen_rebuilt` its head
  ranks best, read each rebuilt crystal again with the model itself (`read_properties`: what
  the crystal is, not what its latent promised) and keep the best `num`; SR5/10/15 are the
  fractions of the `num` whose judged value is in the best 5/10/15% of the training split."""
  z, predicted = ranked_draws(model, settings.screen_draws, settings.screen_rebuilt,
                              settings.seed, target.index, settings.direction, target.bounds)
  grids = model.decode(z, batch_size=settings.batch_size)
  rebuilt = model.to_crystals(grids)
  structures = [r.structure if r.valid and metrics.cdvae_valid(r.structure) else None
                for r in rebuilt]
  logging.info("screen: %d of %d rebuilt draws valid", sum(s is not None for s in structures),
               len(structures))
  reread = read_properties(model, structures, target.index)
  sign = 1.0 if settings.direction == "minimize" else -1.0
  order = np.argsort(np.where(np.isfinite(reread), sign * reread, np.inf), kind="stable")
  kept = [int(i) for i in order[:settings.num] if np.isfinite(reread[i])]
  kept_structures = [structures[i] for i in kept]
  judged = np.full(settings.num, np.nan)  # a place not filled is a miss
  judged[:len(kept)] = read_properties(target.judge, kept_structures, target.judge_index)
  novelty = generation_metrics.uniqueness_and_novelty(
      kept_structures, [crystal.to_structure() for crystal in target.training])
  results = {
      "method": "screen", "property": target.name, "direction": settings.direction,
      "draws": settings.screen_draws, "rebuilt": len(z), "num": settings.num,
      "kept": len(kept), "judge": settings.judge, "training_range": list(target.bounds),
      **success_rates(judged, target.training_values, settings.direction),
      "valid_fraction_rebuilt": float(np.mean([s is not None for s in structures])),
      "head_prediction_kept_mean": float(predicted[kept].mean()) if kept else float("nan"),
      "reread_kept_mean": float(reread[kept].mean()) if kept else float("nan"),
      "judged_kept_mean": float(np.nanmean(judged)) if kept else float("nan"),
      "training_mean": (float(target.training_values.mean()) if target.training_values.size
                        else float("nan")),
      **novelty,
  }
  writing.write_cifs([rebuilt[i] for i in kept], [f"rank_{rank:02d}" for rank in range(len(kept))],
                     out_dir / "cifs" / "screened")
  plots.plot_screening(reread[kept], judged[:len(kept)], target.training_values, target.name,
                       out_dir / "screening.png")
  shown = kept[:16]
  if shown:
    chosen = {key: values[shown] for key, values in grids.items()}
    plots.plot_gallery({"density": chosen["density"],
                        "species": model.species_to_show(chosen, [rebuilt[i] for i in shown])},
                       [generation.label(rebuilt[i]) for i in shown], model.spec,
                       out_dir / "gallery.png", f"screened ({settings.direction} {target.name})")
  writing.write_json(out_dir / "summary.json", results)
  print(f"Screened {settings.screen_draws} prior draws ({settings.direction} {target.name}):"
        f" {len(z)} rebuilt, {len(kept)} kept; written to {out_dir}")
  print(f"  kept: head {results['head_prediction_kept_mean']:.4g}, read again"
        f" {results['reread_kept_mean']:.4g}, judged {results['judged_kept_mean']:.4g}"
        f" (training mean {results['training_mean']:.4g}); novel {results['novelty']:.2f}")
  print(f"  SR5 {results['sr5']:.3f}  SR10 {results['sr10']:.3f}  SR15 {results['sr15']:.3f}"
        f"  (judge: {results['judge']})")
  return results
