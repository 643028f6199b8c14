"""`--mode=evaluate`: reconstruct a split with a trained model and measure it (paper + CDVAE).

For every crystal of the split: voxelise it as at evaluation, encode to the latent mean (with
`eval.refine_steps`, refined towards the true density: `TrainedModel.reconstruct`), decode,
segment, rebuild a crystal. Writes `WORKDIR/eval/<split>[-oracle]/` with `metrics.json`,
`cifs/<id>.cif` (+ `invalid.csv` naming each sample that gave no crystal and why) and the
paper's Fig. 3/4 panels as PNGs. With `config.eval.oracle`, the same post-processing runs on
the TRUE species grids instead (and the true lattice as the lattice head's output, where the
model has one): the upper bound that segmentation and lattice recovery allow.

In-cube atom metrics compare the decoded atoms with the TRUE atoms as evaluation places them in
the cube (`true_atoms_in_cube`: every periodic image whose centre lies inside it for a repeat
cube, the cell's atoms for a unit cell), so what segmentation loses shows, in the oracle too.
The decoded atoms are those segmented from the decoded grids or, with `eval.atoms_from=density`
on a repeat cube, the images inside the cube of the fitted crystal.
"""

import csv
import json
import pathlib
import time

from absl import logging
import ml_collections
import numpy as np

from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae import density_fit
from crystal_vae import inference
from crystal_vae import metrics
from crystal_vae import plots
from crystal_vae import progress as progress_lines
from crystal_vae import reconstruction
from crystal_vae import segmentation
from crystal_vae import species_choice
from crystal_vae import voxelize
from crystal_vae import writing


REBUILT_SHOWN = 8  # crystals drawn true vs rebuilt in rebuilt.png


def _caption(crystal_id: str, rebuilt: reconstruction.Reconstruction,
             match: metrics.MatchResult) -> str:
  if not rebuilt.valid:
    return f"{crystal_id}: no crystal ({rebuilt.reason})"
  formula = rebuilt.structure.composition.reduced_formula
  return f"{crystal_id}: {formula}, {'matches' if match.matched else 'no match'}"


def write_matches(path: pathlib.Path, ids: list[str], true: list, predicted: list,
                  matches: list[metrics.MatchResult]) -> None:
  """One row per crystal: what it is (formula, atoms per cell, elements) and how it came back
  (matched, framework matched, rms, the reason when no crystal was rebuilt)."""
  with open(path, "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["id", "formula", "num_atoms", "elements", "matched", "framework_matched",
                     "rms_dist", "rebuilt_formula", "rebuilt_num_atoms", "reason"])
    for crystal_id, structure, rebuilt, match in zip(ids, true, predicted, matches):
      writer.writerow([
          crystal_id, structure.composition.reduced_formula, len(structure),
          " ".join(sorted({site.specie.symbol for site in structure})), int(match.matched),
          int(match.framework), "" if match.rms_dist is None else f"{match.rms_dist:.4f}",
          rebuilt.structure.composition.reduced_formula if rebuilt.valid else "",
          len(rebuilt.structure) if rebuilt.valid else "", "" if rebuilt.valid else rebuilt.reason])


def _primitive_count(structure) -> int:
  return len(structure.get_primitive_structure())


def true_atoms_in_cube(crystal: crystals.Crystal, box: float, representation: str
                       ) -> segmentation.Atoms:
  """The crystal's atoms as evaluation voxelises it (unrotated): for a repeat cube (a cell corner
  at the origin) every periodic image with its centre inside [0, box]³, for a unit cell the
  cell's atoms, each as its image nearest the cell centre (`voxelize.centred_frac`), with the
  cell centred in the cube."""
  if representation == "repeat":
    return density_fit.images_in_cube(crystal.atomic_numbers, crystal.frac_coords,
                                      crystal.lattice, box)
  frac = np.asarray(voxelize.centred_frac(crystal.frac_coords, crystal.lattice))
  positions = frac @ crystal.lattice + box / 2 - 0.5 * crystal.lattice.sum(axis=0)
  near_face = np.any((positions < 0.5) | (positions > box - 0.5), axis=1)
  return segmentation.Atoms(np.asarray(crystal.atomic_numbers, np.int32), positions,
                            np.zeros(len(positions), np.int64), near_face)


def touches_face(positions: np.ndarray, spec: voxelize.GridSpec) -> np.ndarray:
  """Whether each atom's species sphere reaches a voxel of the cube's outer layer (where the
  face cuts it), exactly: the nearest outer-layer voxel centre of each face lies within the
  species radius. Segmentation marks the same atoms `on_boundary`."""
  centres = spec.voxel_centres()
  snapped = np.clip(np.rint(positions / spec.voxel_size - 0.5), 0, spec.grid - 1)
  snapped = centres[snapped.astype(np.int64)]
  touches = np.zeros(len(positions), bool)
  for axis in range(3):
    for face in (centres[0], centres[-1]):
      nearest = snapped.copy()
      nearest[:, axis] = face
      touches |= np.linalg.norm(positions - nearest, axis=1) <= spec.species_radius
  return touches


def whole_atoms(atoms: segmentation.Atoms, spec: voxelize.GridSpec, segmented: bool
                ) -> segmentation.Atoms:
  """The atoms that no cube face cuts: for segmented atoms those not `on_boundary` (no voxel in
  the outer layer), for atoms placed geometrically those that do not `touches_face`."""
  keep = ~atoms.on_boundary if segmented else ~touches_face(atoms.positions, spec)
  return segmentation.Atoms(atoms.species[keep], atoms.positions[keep], atoms.voxels[keep],
                            atoms.on_boundary[keep])


def fitted_and_true_z(model: inference.TrainedModel, true_crystals: list[crystals.Crystal]
                      ) -> np.ndarray:
  """(fitted Z, true Z) of every distinct site a repeat model reads off its decoded densities
  (`density_fit`, Z unrounded) that lies within the species radius of a true atom: how far the
  density's Z is from the truth (`launch/species_errors.py`)."""
  grids = model.voxelize(true_crystals)
  _, decoded = model.reconstruct(grids)
  spec, pairs = model.spec, []
  for crystal, density in zip(true_crystals, decoded["density"]):
    fit = density_fit.DensityFit(density, spec.box, spec.sigma, spec.cutoff)
    basis = density_fit.lattice_from_density(fit.density, fit.box)
    if basis is None:
      continue
    z, site_frac, basis = density_fit.find_sites(fit, basis, min_z=model.config.eval.min_site_z)
    images = density_fit.images_in_cube(np.arange(z.size), site_frac, basis, fit.box)
    true = true_atoms_in_cube(crystal, spec.box, "repeat")
    matched = {}
    for position, site in zip(images.positions, images.species):
      distances = np.linalg.norm(true.positions - position, axis=1)
      if distances.size and distances.min() < spec.species_radius:
        matched[int(site)] = (float(z[site]), int(true.species[np.argmin(distances)]))
    pairs += matched.values()
  return np.array(pairs).reshape(-1, 2)


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
  progress = progress_lines.Progress(f"evaluate: rebuilt {split}", count)
  property_names = tuple(config.model.properties)
  predicted_properties, true_properties = [], []
  for begin in range(0, count, settings.batch_size):
    batch = [datasets.record_to_crystal(source[i])
             for i in range(begin, min(begin + settings.batch_size, count))]
    grids = model.voxelize(batch, seed=config.seed)
    true_atoms = [true_atoms_in_cube(c, model.spec.box, config.representation) for c in batch]
    if settings.oracle:
      decoded = dict(grids)
      if config.model.lattice_head:
        decoded["lattice"] = np.stack([c.lattice for c in batch])  # unrotated at evaluation
      decoded_atoms = model.atoms(grids)
    else:
      mean, decoded = model.reconstruct(grids)
      # A repeat cube read off the density is not segmented (`to_crystals` fits it).
      decoded_atoms = None if model.fits_repeat_cube else model.atoms(decoded)
      voxel_errors.append(metrics.voxel_mse(decoded["density"], grids["density"]))
      if property_names:
        predicted_properties.append(model.predict_properties(mean))
        true_properties += [crystals.property_values(crystal, property_names) for crystal in batch]
      if "composition" in decoded:  # the composition head's counts for the true number of atoms
        compositions_exact += [
            species_choice.composition_is_exact(
                fractions, np.bincount(crystal.atomic_numbers, minlength=fractions.size))
            for fractions, crystal in zip(decoded["composition"], batch)]
    rebuilt = model.to_crystals(decoded, decoded_atoms)
    if model.fits_repeat_cube:
      decoded_atoms = [r.cube_atoms for r in rebuilt]  # the fitted crystal's images in the cube
    elif config.representation == "unit_cell":  # each atom with its rebuilt site's species
      decoded_atoms = [a if r.cube_atoms is None else r.cube_atoms
                       for r, a in zip(rebuilt, decoded_atoms)]
    if config.representation == "repeat":  # atoms cut by a face are compared on neither side
      segmented = not model.fits_density
      decoded_atoms = [whole_atoms(a, model.spec, segmented) for a in decoded_atoms]
      true_atoms = [whole_atoms(a, model.spec, False) for a in true_atoms]
    comparisons += [metrics.compare_atoms(p, t) for p, t in zip(decoded_atoms, true_atoms)]
    predicted += rebuilt
    true += [crystal.to_structure() for crystal in batch]
    ids += [crystal.id for crystal in batch]
    progress.advance(len(batch))

  structures = [r.structure if r.valid else None for r in predicted]
  matches = metrics.match_results(structures, true)
  results = {"split": split, "oracle": bool(settings.oracle), "num_samples": len(ids),
             "refine_steps": 0 if settings.oracle else int(settings.refine_steps),
             **metrics.atom_metrics(comparisons),
             **metrics.summarise_matches(matches, sum(s is not None for s in structures))}
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
  if predicted_properties:
    predicted_properties = np.concatenate(predicted_properties)
    true_properties = np.stack(true_properties)
    results["properties"] = metrics.property_metrics(
        predicted_properties, true_properties, property_names, config.model.property_means)
  mse = np.concatenate(voxel_errors) if voxel_errors else None
  if mse is not None:
    results.update(metrics.voxel_metrics(mse))
  results["seconds"] = time.time() - start

  out_dir.mkdir(parents=True, exist_ok=True)
  writing.write_cifs(predicted, ids, out_dir / "cifs")
  write_matches(out_dir / "matches.csv", ids, true, predicted, matches)
  plots.save_evaluation_figures(out_dir, comparisons, mse)
  shown = min(REBUILT_SHOWN, len(ids))
  plots.plot_rebuilt_crystals(true[:shown], structures[:shown],
                              [_caption(i, r, m) for i, r, m in zip(
                                  ids, predicted, matches)][:shown],
                              out_dir / "rebuilt.png")
  if "properties" in results:
    plots.plot_property_parity(predicted_properties, true_properties, property_names,
                               results["properties"], out_dir / "properties.png")
  writing.write_json(out_dir / "metrics.json", results)
  logging.info("wrote %s: %s", out_dir, json.dumps(results, sort_keys=True))
  print(f"Evaluation of {len(ids)} {split} crystals written to {out_dir}")
  for key in ("match_rate", "match_rate_cdvae", "framework_match_rate", "rms_dist", "valid_rate",
              "cell_atom_count_exact", "composition_exact", "atom_count_exact",
              "atom_count_within_2", "species_exact",
              "distance_true_to_predicted_p50", "distance_predicted_to_true_p50", "voxel_mse_mean"):
    if key in results:
      print(f"  {key}: {results[key]:.4f}")
  for name, values in results.get("properties", {}).items():
    print(f"  property {name}: MAE {values['mae']:.4g} (training mean:"
          f" {values['baseline_mae']:.4g}), R² {values['r2']:.3f} over {values['count']}")
  return results
