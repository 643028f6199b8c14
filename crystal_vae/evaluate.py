"""`--mode=evaluate`: reconstruct a split with a trained model and measure it (paper + CDVAE).

For every crystal of the split: voxelise it as at evaluation, encode to the latent mean, decode,
segment, rebuild a crystal. Writes `WORKDIR/eval/<split>[-oracle]/` with `metrics.json`,
`cifs/<id>.cif` (+ `invalid.csv` naming each sample that gave no crystal and why) and the
paper's Fig. 3/4 panels as PNGs. With `config.eval.oracle`, the same post-processing runs on
the TRUE species grids instead: the upper bound that segmentation and lattice recovery allow.

In-cube atom metrics compare the atoms segmented from the decoded grids with those segmented
from the true grids (the same cube, the same boundary cuts); with `eval.atoms_from=density` on a
repeat cube, the images inside the cube of the fitted crystal with those of the true one.
"""

import json
import pathlib
import time

from absl import logging
import ml_collections
import numpy as np

from crystal_vae import datasets
from crystal_vae import density_fit
from crystal_vae import inference
from crystal_vae import metrics
from crystal_vae import plots
from crystal_vae import reconstruction


def _finite_or_none(results: dict) -> dict:
  """NaN and inf (e.g. a distance with no atoms to compare) become null: strict JSON."""
  return {key: None if isinstance(value, float) and not np.isfinite(value) else value
          for key, value in results.items()}


def _primitive_count(structure) -> int:
  return len(structure.get_primitive_structure())


def out_dir_name(settings: ml_collections.ConfigDict) -> str:
  """Where under the workdir's `eval/` a split's evaluation is written."""
  return f"{settings.split}-oracle" if settings.oracle else settings.split


def evaluate(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
             out_dir: pathlib.Path) -> dict[str, float]:
  """`--mode=evaluate`: reconstructs `settings.split` of the model's dataset and measures it.

  With `settings.oracle` the TRUE grids are post-processed (the model needs no variables).
  """
  start = time.time()
  config = model.config
  split = settings.split
  source = datasets.split_source(config.dataset, split)
  count = len(source)
  if settings.num_batches > 0:
    count = min(count, settings.num_batches * settings.batch_size)

  comparisons, voxel_errors, predicted, true, ids = [], [], [], [], []
  compositions_exact = []
  for begin in range(0, count, settings.batch_size):
    batch = [datasets.record_to_crystal(source[i])
             for i in range(begin, min(begin + settings.batch_size, count))]
    grids = model.voxelize(batch, seed=config.seed)
    true_atoms = model.atoms(grids)
    if settings.oracle:
      decoded = dict(grids)
      if model.config.representation == "unit_cell":
        decoded["lattice"] = np.stack([c.lattice for c in batch])  # unrotated at evaluation
      decoded_atoms = true_atoms
    else:
      mean, _ = model.encode(grids["density"], composition=grids["composition"])
      decoded = model.decode(mean, condition=model.condition(grids["density"]))
      decoded_atoms = model.atoms(decoded)
      voxel_errors.append(metrics.voxel_mse(decoded["density"], grids["density"]))
      if "composition" in decoded:  # the composition head's counts for the true number of atoms
        compositions_exact += [
            np.array_equal(reconstruction.composition_counts(fractions, crystal.num_atoms),
                           np.bincount(crystal.atomic_numbers, minlength=fractions.size))
            for fractions, crystal in zip(decoded["composition"], batch)]
    rebuilt = model.to_crystals(decoded, decoded_atoms)
    if model.fits_density and model.config.representation == "repeat":
      # Both sides as the images of a crystal (the evaluation cube: unrotated, origin at a corner).
      decoded_atoms = [r.cube_atoms for r in rebuilt]
      true_atoms = [density_fit.images_in_cube(c.atomic_numbers, c.frac_coords, c.lattice,
                                               model.spec.box) for c in batch]
    comparisons += [metrics.compare_atoms(p, t) for p, t in zip(decoded_atoms, true_atoms)]
    predicted += rebuilt
    true += [crystal.to_structure() for crystal in batch]
    ids += [crystal.id for crystal in batch]
    logging.info("evaluated %d/%d", len(ids), count)

  structures = [r.structure if r.valid else None for r in predicted]
  results = {"split": split, "oracle": bool(settings.oracle), "num_samples": len(ids),
             **metrics.atom_metrics(comparisons), **metrics.match_metrics(structures, true)}
  cell_counts_exact = [s is not None and _primitive_count(s) == _primitive_count(t)
                       for s, t in zip(structures, true)]
  results["cell_atom_count_exact"] = float(np.mean(cell_counts_exact)) if ids else float("nan")
  reasons = {}
  for r in predicted:
    if not r.valid:
      reasons[r.reason] = reasons.get(r.reason, 0) + 1
  results["invalid_reasons"] = reasons
  if compositions_exact:
    results["composition_exact"] = float(np.mean(compositions_exact))
  mse = np.concatenate(voxel_errors) if voxel_errors else None
  if mse is not None:
    results.update(metrics.voxel_metrics(mse))
  results["seconds"] = time.time() - start

  out_dir.mkdir(parents=True, exist_ok=True)
  reconstruction.write_cifs(predicted, ids, out_dir / "cifs")
  plots.save_evaluation_figures(out_dir, comparisons, mse)
  (out_dir / "metrics.json").write_text(json.dumps(_finite_or_none(results), indent=2,
                                                   sort_keys=True))
  logging.info("wrote %s: %s", out_dir, json.dumps(results, sort_keys=True))
  print(f"Evaluation of {len(ids)} {split} crystals written to {out_dir}")
  for key in ("match_rate", "match_rate_cdvae", "framework_match_rate", "rms_dist", "valid_rate",
              "cell_atom_count_exact", "composition_exact", "atom_count_exact",
              "atom_count_within_2", "species_exact",
              "distance_true_to_predicted_p50", "distance_predicted_to_true_p50", "voxel_mse_mean"):
    if key in results:
      print(f"  {key}: {results[key]:.4f}")
  return results
