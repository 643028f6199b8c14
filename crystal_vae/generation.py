"""Generation with a trained model: random draws, latent interpolation and latent traversal.

Three `--mode`s, each `(model, settings, out_dir) -> summary` like every mode (main.py): the
restored model (its config decides representation, grid and dataset), the mode's own settings
(`config.<mode>`) and the folder it writes (`workdir/<mode>/`):

* `sample` (paper §4.4, Fig. 9): `config.sample.num` latents drawn from the prior
  `config.sample.prior` (latent_prior.py; by default a diffusion model learned over the training
  crystals' latent means, fitted once and kept in `workdir/latent_prior/`) with its spread scaled
  by `temperature`, from `config.sample.seed`, decoded, segmented and rebuilt into crystals.
  Writes `cifs/` (+ `invalid.csv`), `gallery.png` (a density slice of each sample with its
  segmentation), `nearest_neighbours.png` (nearest-neighbour interatomic distances of the valid
  samples against training crystals, Fig. 9A) and `summary.json`: `valid_fraction`
  (reconstructions that are crystals: at least one atom, sites >= 0.5 Å apart), CDVAE's
  generation metrics (`generation_metrics.py`: structural / compositional validity, COV-R and
  COV-P against the first `config.sample.num_reference` crystals of
  `config.sample.reference_split`, Wasserstein distances of density and number of elements) and
  the uniqueness and novelty (against every training crystal) of the CDVAE-valid samples. The
  reference fingerprints are kept in `reference_fingerprints.npz` and reused while the reference
  crystals are the same.
* `interpolate` (Fig. 8): encodes `config.interpolate.start` and `.end` (CIF paths or dataset
  ids; empty = the first / second training crystal) to their latent means and decodes
  `config.interpolate.steps` points on the line between them, linear and spherical (slerp).
  Writes `<method>/cifs/step_XX.cif`, `panel.png`, `interpolation.gif`, `summary.json`.
* `traverse` (Fig. 10D): encodes `config.traverse.crystal` and sets latent coordinate
  `config.traverse.dim` to `steps` values from `low` to `high`; writes `traverse.png`,
  `summary.json`.

A conditional model (`config.model.conditional`) decodes random latents with the maximum
densities of training crystals drawn at random as conditions, and interpolates the condition
linearly between the two endpoints' own.
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from collections.abc import Sequence

from absl import logging
import ml_collections
import numpy as np
from pymatgen.core import Structure
from scipy import stats

from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae import generation_metrics
from crystal_vae import inference
from crystal_vae import latent_prior
from crystal_vae import metrics
from crystal_vae import plots
from crystal_vae import progress
from crystal_vae import reconstruction
from crystal_vae import writing

METHODS = ("linear", "slerp")


# ---------------------------------------------------------------------------------------------
# Latents, decoding, crystals.


def write_cifs(reconstructions: Sequence[reconstruction.Reconstruction], ids: Sequence[str],
               directory: pathlib.Path) -> dict[str, int]:
  """CIFs of the valid reconstructions and `invalid.csv` for the rest; the counts per outcome."""
  valid, invalid = writing.write_cifs(reconstructions, ids, directory)
  counts = {"valid": valid, "invalid": invalid}
  for r in reconstructions:
    if not r.valid:
      counts[f"invalid_{r.reason}"] = counts.get(f"invalid_{r.reason}", 0) + 1
  return counts


def load_crystal(name: str, config: ml_collections.ConfigDict, default_index: int = 0
                 ) -> crystals.Crystal:
  """A crystal named by a CIF path or a dataset id (searched in every split of
  `config.dataset`); an empty name is training crystal `default_index`."""
  limits = crystals.CrystalLimits(box=config.dataset.box, max_z=config.dataset.max_z,
                                  max_atoms=config.dataset.max_atoms)
  if name.endswith(".cif") or pathlib.Path(name).is_file():
    return crystals.read_cif_file(name, limits)
  sources = datasets.load_data_sources(config.dataset)
  if not name:
    return datasets.record_to_crystal(sources["train"][default_index])
  for source in sources.values():
    for index in range(len(source)):
      record = source[index]
      material_id = record["material_id"]
      if (material_id.decode() if isinstance(material_id, bytes) else str(material_id)) == name:
        return datasets.record_to_crystal(record)
  raise inference.SettingsError(
      f"{name!r} is neither a CIF file nor an id in dataset {config.dataset.name!r}")


def training_crystals(config: ml_collections.ConfigDict, num: int, seed: int
                      ) -> list[crystals.Crystal]:
  """Up to `num` crystals (-1: all) of the train split of `config.dataset`, a random subset
  from `seed`."""
  source = datasets.split_source(config.dataset, "train")
  chosen = np.random.default_rng(seed).permutation(len(source))[:len(source) if num < 0 else num]
  return [datasets.record_to_crystal(source[int(i)]) for i in np.sort(chosen)]


def best_reconstructed(model: inference.TrainedModel, chosen: Sequence[crystals.Crystal],
                       fraction: float, batch_size: int) -> np.ndarray:
  """The latent means of the `fraction` of `chosen` crystals (all when it is 1) whose means decode
  closest to their own density (voxel MSE), in their order: a prior fitted to them draws where
  the model reconstructs crystals well."""
  if fraction >= 1:
    return model.encode_crystals(chosen, batch_size)[0]
  means, errors = [], []
  counter = progress.Progress("latent prior: reconstructed", len(chosen), unit="crystals")
  for begin in range(0, len(chosen), batch_size):
    grids = model.voxelize(chosen[begin:begin + batch_size])
    condition = model.condition(grids["density"])
    mean, _ = model.encode(grids["density"], condition, grids["composition"])
    means.append(mean)
    errors.append(metrics.voxel_mse(model.decode_density(mean, condition), grids["density"]))
    counter.advance(len(mean))
  means, errors = np.concatenate(means), np.concatenate(errors)
  kept = np.argsort(errors, kind="stable")[:max(1, int(round(fraction * len(errors))))]
  return means[np.sort(kept)]


def prior_of(model: inference.TrainedModel, settings: ml_collections.ConfigDict
             ) -> tuple[latent_prior.Prior, dict]:
  """The prior `settings.prior` over `model`'s latents and its record: N(0, I), or a prior
  fitted to the latent means of `settings.prior_crystals` training crystals (-1: all), the
  fraction `settings.prior_best_fraction` of them that the model reconstructs best
  (`best_reconstructed`), restored from the model's workdir (`latent_prior/`) when it was saved
  there for this checkpoint with these settings, else fitted and saved there."""
  try:
    description = latent_prior.description(settings)
  except ValueError as error:
    raise inference.SettingsError(str(error)) from None
  if description["kind"] == "standard":
    return latent_prior.GaussianPrior.standard(model.config.model.latent_dim), description
  expected = {**description, "model_step": model.step}
  directory = None if model.workdir is None else model.workdir / latent_prior.FOLDER
  if directory is not None:
    restored = latent_prior.load(directory, expected)
    if restored is not None:
      print(f"latent prior: {description['kind']}, restored from {directory}", flush=True)
      return restored, expected
  chosen = training_crystals(model.config, settings.prior_crystals, settings.seed)
  latents = best_reconstructed(model, chosen, settings.prior_best_fraction, settings.batch_size)
  print(f"latent prior: fitting the {description['kind']} prior to the latent means of"
        f" {len(latents)} of {len(chosen)} training crystals", flush=True)
  prior, extra = latent_prior.fit(settings, latents)
  record = {"description": expected, "num_crystals": len(latents),
            "dataset": model.config.dataset.name, **extra}
  if directory is not None:
    try:
      latent_prior.save(prior, record, directory)
      print(f"latent prior: saved in {directory}", flush=True)
    except OSError as error:
      print(f"note: the latent prior could not be saved in {directory} ({error}); it is fitted"
            " again next time", flush=True)
  return prior, expected


def split_crystals(config: ml_collections.ConfigDict, split: str, num: int
                   ) -> list[crystals.Crystal]:
  """The first `num` crystals (-1: all) of a split of `config.dataset`."""
  source = datasets.split_source(config.dataset, split)
  count = len(source) if num < 0 else min(num, len(source))
  return [datasets.record_to_crystal(source[index]) for index in range(count)]


def draw_conditions(model: inference.TrainedModel, num: int, seed: int,
                    structures: Sequence[crystals.Crystal]) -> np.ndarray | None:
  """For a conditional model, `num` conditions drawn from the crystals' maximum densities."""
  if not model.config.model.conditional:
    return None
  maxima = model.maximum_densities(structures)
  return np.random.default_rng(seed).choice(maxima, size=num).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Distribution statistics (CDVAE); validity is in metrics.py.


def nearest_neighbour_distances(structure: Structure) -> np.ndarray:
  """For each site, the distance (Å) to its nearest other site or periodic image."""
  radius = min(structure.lattice.abc) + 1e-6  # every site's own image lies within
  centres, _, _, distances = structure.get_neighbor_list(radius)
  nearest = np.full(len(structure), np.inf)
  np.minimum.at(nearest, centres, distances)
  return nearest


def reference_fingerprints(structures: Sequence[Structure], ids: Sequence[str],
                           cache: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """`generation_metrics.fingerprints` of the reference crystals, read from `cache` (.npz) when
  it holds the same crystal ids, else computed and written there."""
  if cache.exists():
    with np.load(cache) as saved:
      if saved["ids"].tolist() == list(ids):
        return saved["structure"], saved["composition"]
  logging.info("fingerprinting %d reference crystals", len(structures))
  structure, composition = generation_metrics.fingerprints(structures)
  cache.parent.mkdir(parents=True, exist_ok=True)
  np.savez(cache, ids=np.asarray(ids), structure=structure, composition=composition)
  return structure, composition


def sample_summary(reconstructions: Sequence[reconstruction.Reconstruction],
                   reference: Sequence[Structure],
                   reference_fingerprints: tuple[np.ndarray, np.ndarray],
                   cutoffs: tuple[float, float]) -> dict[str, float]:
  """The fraction rebuilt into crystals and CDVAE's metrics of the generated crystals."""
  num = len(reconstructions)
  num_valid = sum(r.valid for r in reconstructions)
  return {
      "num_samples": num,
      "num_valid": num_valid,
      "valid_fraction": num_valid / num if num else float("nan"),
      **generation_metrics.generation_metrics([r.structure if r.valid else None
                                               for r in reconstructions],
                                              reference, reference_fingerprints, cutoffs),
  }


# ---------------------------------------------------------------------------------------------
# Latent paths.


def interpolate_latents(start: np.ndarray, end: np.ndarray, steps: int, method: str
                        ) -> np.ndarray:
  """`steps` latents from `start` to `end` (both included), t evenly spaced in [0, 1].

  linear: (1 - t) start + t end. slerp: sin((1 - t) Ω) / sin Ω · start + sin(t Ω) / sin Ω · end,
  Ω the angle between the two (the line when they are parallel).
  """
  start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
  t = np.linspace(0.0, 1.0, steps)[:, None]
  if method == "linear":
    path = (1 - t) * start + t * end
  elif method == "slerp":
    cosine = np.dot(start, end) / max(np.linalg.norm(start) * np.linalg.norm(end), 1e-12)
    omega = np.arccos(np.clip(cosine, -1.0, 1.0))
    if np.sin(omega) < 1e-6:  # (anti)parallel: the great circle is undefined, use the line.
      path = (1 - t) * start + t * end
    else:
      path = (np.sin((1 - t) * omega) * start + np.sin(t * omega) * end) / np.sin(omega)
  else:
    raise inference.SettingsError(f"interpolation method {method!r} not in {METHODS}")
  path[0], path[-1] = start, end
  return path.astype(np.float32)


def traverse_latents(z: np.ndarray, dim: int, values: Sequence[float]) -> np.ndarray:
  """Copies of `z` (L,) with coordinate `dim` set to each of `values`: (len(values), L)."""
  if not 0 <= dim < z.shape[-1]:
    raise inference.SettingsError(f"latent dimension {dim} outside [0, {z.shape[-1]})")
  path = np.repeat(np.asarray(z, np.float32)[None], len(values), axis=0)
  path[:, dim] = values
  return path


def label(r: reconstruction.Reconstruction) -> str:
  """A crystal's reduced formula, or its reason in parentheses."""
  return r.structure.composition.reduced_formula if r.valid else f"({r.reason})"


# ---------------------------------------------------------------------------------------------
# Modes.


def generate(model: inference.TrainedModel, num: int, seed: int, temperature: float = 1.0, *,
             prior: latent_prior.Prior | None = None, condition: np.ndarray | None = None,
             batch_size: int = 16
             ) -> tuple[np.ndarray, dict[str, np.ndarray], list[reconstruction.Reconstruction]]:
  """Random draws from `prior` (default N(0, I)): latents, decoded grids and their crystals (or
  reasons)."""
  if prior is None:
    prior = latent_prior.GaussianPrior.standard(model.config.model.latent_dim)
  z = prior.sample(num, seed, temperature)
  grids = model.decode(z, condition, batch_size)
  counter = progress.Progress("sample: rebuilt", num, unit="draws")
  rebuilt = []
  for begin in range(0, num, batch_size):
    batch = {name: values[begin:begin + batch_size] for name, values in grids.items()}
    rebuilt += model.to_crystals(batch)
    counter.advance(len(batch["density"]))
  return z, grids, rebuilt


def property_distances(model: inference.TrainedModel, z: np.ndarray,
                       rebuilt: Sequence[reconstruction.Reconstruction],
                       reference: Sequence[crystals.Crystal]) -> dict[str, float]:
  """CDVAE's d_E for each property of the model's head: the Wasserstein distance between the
  head's predictions for the draws that gave a crystal and the reference crystals' true values
  (CDVAE predicts the draws' property with a separately trained network; here the model's own
  head reads the draw's latent)."""
  names = tuple(model.config.model.properties)
  kept = np.array([r.valid for r in rebuilt])
  if not names or not kept.any():
    return {}
  predicted = model.predict_properties(z[kept])
  results = {}
  for index, name in enumerate(names):
    true = np.array([crystal.properties.get(name, np.nan) for crystal in reference], np.float64)
    true = true[np.isfinite(true)]
    if true.size:
      results[f"wasserstein_{name}"] = float(stats.wasserstein_distance(predicted[:, index], true))
  return results


def sample(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
           out_dir: pathlib.Path) -> dict:
  """`--mode=sample`: random draws from the prior; see the module docstring."""
  prior, prior_record = prior_of(model, settings)
  train_crystals = training_crystals(model.config, settings.num_train_structures, settings.seed)
  condition = draw_conditions(model, settings.num, settings.seed, train_crystals)
  z, grids, rebuilt = generate(model, settings.num, settings.seed, settings.temperature,
                               prior=prior, condition=condition, batch_size=settings.batch_size)
  ids = [f"sample_{index:04d}" for index in range(settings.num)]
  counts = write_cifs(rebuilt, ids, out_dir / "cifs")
  reference_crystals = split_crystals(model.config, settings.reference_split,
                                      settings.num_reference)
  reference = [crystal.to_structure() for crystal in reference_crystals]
  cutoffs = generation_metrics.coverage_cutoffs(model.config.dataset.name)
  fingerprints = reference_fingerprints(
      reference, [crystal.id for crystal in reference_crystals],
      out_dir / "reference_fingerprints.npz")
  results = {"seed": settings.seed, "temperature": settings.temperature,
             "prior": prior_record, **counts,
             **sample_summary(rebuilt, reference, fingerprints, cutoffs),
             "reference": f"{settings.reference_split} ({len(reference)})",
             "coverage_cutoffs": list(cutoffs)}
  valid = [r.structure for r in rebuilt if r.valid and metrics.cdvae_valid(r.structure)]
  training = [crystal.to_structure()
              for crystal in split_crystals(model.config, "train", -1)]
  results.update(generation_metrics.uniqueness_and_novelty(valid, training))
  results["novelty_against"] = f"train ({len(training)})"
  results.update(property_distances(model, z, rebuilt, reference_crystals))
  train_structures = [crystal.to_structure() for crystal in train_crystals]
  results["num_train_structures"] = len(train_structures)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sample_distances = np.concatenate(
        [nearest_neighbour_distances(r.structure) for r in rebuilt if r.valid] or [np.zeros(0)])
    train_distances = np.concatenate([nearest_neighbour_distances(s)
                                      for s in train_structures])
  results["nearest_neighbour_median_samples"] = (float(np.median(sample_distances))
                                                 if sample_distances.size else float("nan"))
  results["nearest_neighbour_median_train"] = float(np.median(train_distances))
  shown = min(settings.gallery, settings.num)
  plots.plot_gallery({"density": grids["density"][:shown],
                      "species": model.species_to_show(grids, rebuilt)[:shown]},
                     [label(r) for r in rebuilt[:shown]], model.spec, out_dir / "gallery.png",
                     "random samples")
  plots.plot_nearest_neighbours(sample_distances, train_distances,
                                out_dir / "nearest_neighbours.png")
  writing.write_json(out_dir / "summary.json", results)
  logging.info("wrote %s: %s", out_dir, results)
  print(f"{settings.num} samples written to {out_dir}")
  for key in ("valid_fraction", "cdvae_structure_valid", "cdvae_composition_valid", "cov_recall",
              "cov_precision", "wasserstein_density", "wasserstein_num_elements", "uniqueness",
              "novelty"):
    print(f"  {key}: {results[key]:.4f}")
  return results


def interpolation(model: inference.TrainedModel, start: crystals.Crystal, end: crystals.Crystal,
                  steps: int
                  ) -> dict[str, tuple[dict[str, np.ndarray], list[reconstruction.Reconstruction]]]:
  """Per method: the decoded grids along the path between the two crystals' latent means and
  the crystals rebuilt from them."""
  means, condition = model.encode_crystals([start, end])
  path_condition = None
  if condition is not None:
    path_condition = np.linspace(condition[0], condition[1], steps).astype(np.float32)
  results = {}
  for method in METHODS:
    z = interpolate_latents(means[0], means[1], steps, method)
    grids = model.decode(z, path_condition, batch_size=steps)
    results[method] = (grids, model.to_crystals(grids))
  return results


def interpolate(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
                out_dir: pathlib.Path) -> dict:
  """`--mode=interpolate`: see the module docstring."""
  start = load_crystal(settings.start, model.config, 0)
  end = load_crystal(settings.end, model.config, 1)
  paths = interpolation(model, start, end, settings.steps)
  results = {"start": start.id, "end": end.id, "steps": settings.steps}
  for method, (_, rebuilt) in paths.items():
    ids = [f"step_{step:02d}" for step in range(settings.steps)]
    results[method] = {**write_cifs(rebuilt, ids, out_dir / method / "cifs"),
                       "formulas": [label(r) for r in rebuilt]}
  titles = [f"t = {t:.2f}" for t in np.linspace(0.0, 1.0, settings.steps)]
  grids = {method: {"density": decoded["density"],
                    "species": model.species_to_show(decoded, rebuilt)}
           for method, (decoded, rebuilt) in paths.items()}
  title = f"{start.id} → {end.id}"
  inputs = model.voxelize([start, end])  # the two crystals themselves, beside the path
  panel = {method: {key: np.concatenate([inputs[key][:1], path[key], inputs[key][1:]])
                    for key in ("density", "species")} for method, path in grids.items()}
  plots.plot_path(panel, [f"{start.id} (input)", *titles, f"{end.id} (input)"], model.spec,
                  out_dir / "panel.png", f"{title}: decoded path between the inputs' latents")
  plots.write_gif(grids, [f"{title}, {t}" for t in titles], model.spec,
                  out_dir / "interpolation.gif", settings.seconds_per_frame)
  writing.write_json(out_dir / "summary.json", results)
  print(f"Interpolation {title} ({settings.steps} steps) written to {out_dir}")
  for method in METHODS:
    print(f"  {method}: {' | '.join(results[method]['formulas'])}")
  return results


def traverse(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
             out_dir: pathlib.Path) -> dict:
  """`--mode=traverse`: see the module docstring."""
  crystal = load_crystal(settings.crystal, model.config, 0)
  means, condition = model.encode_crystals([crystal])
  values = np.linspace(settings.low, settings.high, settings.steps)
  z = traverse_latents(means[0], settings.dim, values)
  path_condition = None if condition is None else np.repeat(condition, settings.steps)
  grids = model.decode(z, path_condition, batch_size=settings.steps)
  rebuilt = model.to_crystals(grids)
  out_dir.mkdir(parents=True, exist_ok=True)
  titles = [f"z[{settings.dim}] = {v:+.1f}" for v in values]
  true = model.voxelize([crystal])
  panel = {"density": np.concatenate([true["density"], grids["density"]]),
           "species": np.concatenate([true["species"], model.species_to_show(grids, rebuilt)])}
  plots.plot_path({crystal.id: panel}, [f"{crystal.id} (input)", *titles], model.spec,
                  out_dir / "traverse.png",
                  f"{crystal.id}: latent {settings.dim} (encoded {means[0, settings.dim]:+.2f})")
  density = grids["density"].reshape(settings.steps, -1)
  results = {"crystal": crystal.id, "dim": settings.dim,
             "encoded_value": float(means[0, settings.dim]),
             "values": values.tolist(), "max_density": density.max(axis=1).tolist(),
             "mean_abs_change_from_first": np.abs(density - density[:1]).mean(axis=1).tolist(),
             "formulas": [label(r) for r in rebuilt]}
  writing.write_json(out_dir / "summary.json", results)
  print(f"Traversal of latent {settings.dim} for {crystal.id} written to {out_dir}")
  return results
