"""What the draws of `--mode=sample` that miss COV-P miss, and what keeping only self-consistent
draws would buy.

Reads a workdir after `--mode=sample` (its `sample/cifs/` and `sample/reference_fingerprints.npz`)
and prints: of the draws, how many are near no reference crystal in structure only, in
composition only or in both (CDVAE's cutoffs); the atoms per cell of all draws and of those that
miss in structure; the precision (the share near a reference crystal, COV-P's test) of the
CDVAE-valid draws that match a training crystal, of the novel ones with a training crystal's
formula and with a new formula, and by atoms per cell; and, re-encoding each rebuilt crystal
(voxelised as at evaluation) and taking its distance to the draw's own latent (RMS over the
latent's dimensions), COV-R / COV-P,
uniqueness and novelty of the draws that are kept when the least self-consistent ones are
dropped. The draws' latents are drawn again from the workdir's saved prior with the sample
run's number, seed and temperature (its `summary.json`).

  python launch/sample_misses.py --workdir=runs/gen --keep=1.0,0.8
"""

import collections
import json
import pathlib

from absl import app
from absl import flags
import numpy as np
from pymatgen.core import Structure
from scipy import spatial

from crystal_vae import crystals
from crystal_vae import generation
from crystal_vae import generation_metrics
from crystal_vae import inference
from crystal_vae import metrics
from crystal_vae import process_settings
from crystal_vae import quiet_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "a workdir after --mode=sample", required=True)
_KEEP = flags.DEFINE_list("keep", ["1.0", "0.8"], "fractions of the draws kept, most "
                          "self-consistent first")


def main(argv):
  del argv
  process_settings.apply()
  quiet_logging.install()
  workdir = pathlib.Path(_WORKDIR.value)
  model = inference.TrainedModel.restore(workdir)
  settings = model.config.sample
  paths = sorted((workdir / "sample" / "cifs").glob("sample_*.cif"))
  indices = np.array([int(path.stem.split("_")[1]) for path in paths])
  structures = [Structure.from_file(path) for path in paths]
  reference = np.load(workdir / "sample" / "reference_fingerprints.npz")
  reference_fingerprints = (reference["structure"], reference["composition"])
  structure_fp, composition_fp = generation_metrics.fingerprints(structures)
  cutoffs = generation_metrics.coverage_cutoffs(model.config.dataset.name)
  structure_hit = spatial.distance.cdist(structure_fp, reference["structure"]).min(1) <= cutoffs[0]
  composition_hit = (spatial.distance.cdist(composition_fp, reference["composition"]).min(1)
                     <= cutoffs[1])
  print(f"{len(structures)} rebuilt draws; misses: structure only "
        f"{np.sum(~structure_hit & composition_hit)}, composition only "
        f"{np.sum(structure_hit & ~composition_hit)}, both {np.sum(~structure_hit & ~composition_hit)}")
  atoms = np.array([len(s) for s in structures])
  for name, chosen in (("all draws", atoms), ("structure misses", atoms[~structure_hit])):
    print(f"atoms per cell, {name}:", dict(sorted(collections.Counter(chosen.tolist()).items())))

  training = [c.to_structure() for c in generation.split_crystals(model.config, "train", -1)]
  precise = structure_hit & composition_hit
  valid = np.array([metrics.cdvae_valid(s) for s in structures])
  _, novel_all = generation_metrics.unique_and_novel_flags(structures, training)
  novel = novel_all[valid]
  formulas = {s.composition.reduced_formula for s in training}
  new_formula = np.array([s.composition.reduced_formula not in formulas
                          for s, ok in zip(structures, valid) if ok])
  precise_valid, atoms_valid = precise[valid], atoms[valid]
  print(f"{valid.sum()} CDVAE-valid draws, {100 * novel.mean():.1f}% novel; precision:")
  for name, chosen in (("match a training crystal", ~novel),
                       ("novel, a training crystal's formula", novel & ~new_formula),
                       ("novel, a new formula", novel & new_formula)):
    print(f"  {name}: {chosen.sum()} draws, {100 * precise_valid[chosen].mean():.1f}% precise")
  for count in sorted(set(atoms_valid.tolist())):
    chosen = atoms_valid == count
    print(f"  {count} atoms: {chosen.sum()} draws, {100 * precise_valid[chosen].mean():.1f}% "
          f"precise, {100 * novel[chosen].mean():.1f}% novel")

  run = json.loads((workdir / "sample" / "summary.json").read_text())
  prior, _ = generation.prior_of(model, settings)
  z = prior.sample(run["num_samples"], run["seed"], run["temperature"])[indices]
  limits = crystals.CrystalLimits(box=model.config.dataset.box, max_z=model.config.dataset.max_z,
                                  max_atoms=model.config.dataset.max_atoms)
  rebuilt = [crystals.crystal_from_structure(s, path.stem, limits)
             for s, path in zip(structures, paths)]
  means, _ = model.encode_crystals(rebuilt)
  distance = np.linalg.norm(means - z, axis=1) / np.sqrt(z.shape[1])
  for fraction in map(float, _KEEP.value):
    kept = np.flatnonzero(distance <= np.quantile(distance, fraction))
    coverage = generation_metrics.coverage(
        (structure_fp[kept], composition_fp[kept]), reference_fingerprints, cutoffs)
    unique, _ = generation_metrics.unique_and_novel_flags([structures[i] for i in kept], [])
    print(f"keep {fraction:.2f} ({kept.size} draws): COV-R {100 * coverage['cov_recall']:.2f}"
          f"  COV-P {100 * coverage['cov_precision']:.2f}  unique"
          f" {100 * unique.mean():.1f}  novel {100 * novel_all[kept].mean():.1f}")


if __name__ == "__main__":
  app.run(main)
