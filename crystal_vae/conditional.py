"""`--mode=conditional`: generation with the conditional VAE at chosen maximum densities (§4.5).

The conditional model (`config.model.conditional`) multiplies the bottleneck's input and output
by the per-sample maximum of the density grid (trained with the maximum of the true grid). Here
`config.conditional.num_samples` latents drawn from `config.conditional.prior` (seed
`config.conditional.seed`; the model's learned prior by default, as `--mode=sample` draws them;
"standard" is the paper's z ~ N(0, 1), which this model does not decode into crystals) are
decoded at every target of `config.conditional.targets` (or, when empty, `num_targets` values
evenly spaced from `target_min` to `target_max`) and the report (`WORKDIR/conditional/`) says:

* whether the generated maximum follows the target: Pearson correlation of target and generated
  maximum over all (sample, target) pairs and, averaged over the latents, over each latent's
  targets; the per-target mean ± std of the generated maximum;
* whether the geometry is kept while the scale changes: each latent's decoding at every target
  is compared with its decoding at the middle (reference) target: the Pearson correlation of the
  density normalised by its maximum, the mean nearest-atom displacement (Å, reference atoms to
  the nearest atom at the target) and the change in the atom count, averaged over the samples.

Writes `summary.json` and `conditional.png` (target vs generated maximum; one latent's middle
slice at every target).
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
from scipy import spatial

from crystal_vae import generation
from crystal_vae import inference
from crystal_vae import plots
from crystal_vae import progress
from crystal_vae import segmentation
from crystal_vae import writing


def targets_of(settings: ml_collections.ConfigDict) -> np.ndarray:
  """The configured targets, or the configured range."""
  if settings.targets:
    return np.asarray(settings.targets, np.float32)
  return np.linspace(settings.target_min, settings.target_max, settings.num_targets,
                     dtype=np.float32)


def decode_at_targets(model: inference.TrainedModel, z: np.ndarray, targets: np.ndarray,
                      batch_size: int = 16) -> list[dict[str, np.ndarray]]:
  """Decoded grids of the latents (N, L) at each target: one dict of (N, ...) per target."""
  if not model.config.model.conditional:
    raise inference.SettingsError(
        "the checkpoint's model is not conditional (config.model.conditional)")
  return [model.decode(z, np.full(z.shape[0], target, np.float32), batch_size)
          for target in targets]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  return float(np.corrcoef(a, b)[0, 1])


def _mean_displacement(reference: segmentation.Atoms, other: segmentation.Atoms) -> float:
  """Mean distance (Å) from each reference atom to the nearest atom of `other` (NaN if either
  has none)."""
  if len(reference) == 0 or len(other) == 0:
    return float("nan")
  distances, _ = spatial.cKDTree(other.positions).query(reference.positions)
  return float(distances.mean())


def _normalised(density: np.ndarray) -> np.ndarray:
  """Each grid of (N, G, G, G) divided by its maximum, flattened to (N, G³)."""
  flat = density.reshape(density.shape[0], -1)
  return flat / np.maximum(flat.max(axis=1, keepdims=True), 1e-12)


def target_report(targets: np.ndarray, maxima: np.ndarray) -> dict:
  """Target vs generated maximum; `maxima` is (num_targets, num_samples)."""
  return {
      "targets": targets.tolist(),
      "max_density_mean": maxima.mean(axis=1).tolist(),
      "max_density_std": maxima.std(axis=1).tolist(),
      "pearson_target_vs_max": _pearson(np.repeat(targets, maxima.shape[1]), maxima),
      "pearson_target_vs_max_per_latent": float(np.nanmean(
          [_pearson(targets, column) for column in maxima.T])),
  }


def geometry_report(model: inference.TrainedModel, decoded: list[dict[str, np.ndarray]],
                    reference_index: int) -> dict:
  """Per target, how each latent's decoding compares with its decoding at the reference target
  (see the module docstring); averages over samples ignore NaN (no atoms)."""
  reference = decoded[reference_index]
  reference_atoms = model.atoms(reference)
  reference_normalised = _normalised(reference["density"])
  correlation, displacement, count_change = [], [], []
  counter = progress.Progress("conditional: atoms read at", len(decoded), unit="targets",
                              every=0.0)
  for index, grids in enumerate(decoded):
    atoms = reference_atoms if index == reference_index else model.atoms(grids)
    counter.advance()
    current = _normalised(grids["density"])
    correlation.append(float(np.nanmean([_pearson(a, b)
                                         for a, b in zip(current, reference_normalised)])))
    distances = [_mean_displacement(r, a) for r, a in zip(reference_atoms, atoms)]
    displacement.append(float(np.nanmean(distances)) if np.isfinite(distances).any()
                        else float("nan"))
    count_change.append(float(np.mean([abs(len(a) - len(r))
                                       for a, r in zip(atoms, reference_atoms)])))
  return {"reference_target_index": reference_index,
          "normalised_density_correlation": correlation,
          "mean_atom_displacement": displacement,
          "mean_abs_atom_count_change": count_change,
          "reference_atom_count_mean": float(np.mean([len(a) for a in reference_atoms]))}


def conditional(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
                out_dir: pathlib.Path) -> dict:
  """`--mode=conditional`: see the module docstring."""
  targets = targets_of(settings)
  if not model.config.model.conditional:  # said before a prior is fitted
    raise inference.SettingsError(
        "the checkpoint's model is not conditional (config.model.conditional)")
  prior_settings = ml_collections.ConfigDict(model.config.sample.to_dict())
  prior_settings.prior = settings.prior  # the rest as the model's own prior (latent_prior/)
  prior, _ = generation.prior_of(model, prior_settings)
  z = prior.sample(settings.num_samples, settings.seed)
  decoded = decode_at_targets(model, z, targets, settings.batch_size)
  maxima = np.stack([g["density"].reshape(z.shape[0], -1).max(axis=1) for g in decoded])
  results = {"num_samples": settings.num_samples, "seed": settings.seed, "prior": settings.prior,
             **target_report(targets, maxima),
             "geometry": geometry_report(model, decoded, len(targets) // 2)}
  out_dir.mkdir(parents=True, exist_ok=True)
  plots.plot_conditional(targets, maxima, decoded, model.spec, out_dir / "conditional.png")
  writing.write_json(out_dir / "summary.json", results)
  print(f"Conditional generation at {len(targets)} targets written to {out_dir}")
  print(f"  Pearson(target, generated max): {results['pearson_target_vs_max']:.4f} over all,"
        f" {results['pearson_target_vs_max_per_latent']:.4f} per latent")
  geometry = results["geometry"]
  for index, target in enumerate(targets):
    print(f"  target {target:7.3f}: max {maxima[index].mean():.3f} ± {maxima[index].std():.3f}"
          f"  normalised-density corr {geometry['normalised_density_correlation'][index]:.3f}"
          f"  atom displacement {geometry['mean_atom_displacement'][index]:.3f} Å")
  return results
