"""How each way of naming the sites' elements rebuilds a repeat model's decoded crystals.

    python launch/benchmarks/compare_species_rules.py --workdir=pretrained/perov5_repeat --num=256

Decodes the first `num` crystals of the split, reads the lattice and the sites (unrounded Z) off
each decoded density once (as `--mode=evaluate` does), then names the elements three ways and
prints the StructureMatcher match rate (CDVAE's matcher, species included) of each as a
Markdown table:
  per_site        each site alone: the element of highest log f - (z - Z)² / (2σ²) (the rule
                  before `species_choice.species_from_composition` chose for the whole cell);
  counts_in_order the composition's rounded counts for the number of sites
                  (`species_choice.composition_counts`), given to the sites in order of Z;
  cell            `species_choice.species_from_composition` (the shipped rule).
"""

import warnings

from absl import app
from absl import flags
import numpy as np

from crystal_vae import datasets
from crystal_vae import density_fit
from crystal_vae import inference
from crystal_vae import lattice_recovery
from crystal_vae import metrics
from crystal_vae import reconstruction
from crystal_vae import process_settings
from crystal_vae import species_choice

_WORKDIR = flags.DEFINE_string("workdir", "pretrained/perov5_repeat", "A repeat model's workdir.")
_NUM = flags.DEFINE_integer("num", 256, "Crystals, the first of the split.")
_SPLIT = flags.DEFINE_string("split", "validation", "Dataset split.")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.75", "1.5", "3"], "Values of σ (units of Z) tried.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Crystals decoded at once.")
_MIN_SITE_Z = flags.DEFINE_float("min_site_z", None, "Sites' minimum Z (default: the model's "
                                 "eval.min_site_z).")


def per_site(site_z: np.ndarray, composition: np.ndarray, sigma: float) -> np.ndarray:
  elements = np.arange(1, len(composition))
  log_prior = np.log(np.maximum(np.asarray(composition, np.float64)[1:], 1e-6))
  scores = log_prior - (np.asarray(site_z)[:, None] - elements) ** 2 / (2 * sigma ** 2)
  return elements[np.argmax(scores, axis=1)]


def counts_in_order(site_z: np.ndarray, composition: np.ndarray, sigma: float) -> np.ndarray:
  del sigma
  counts = species_choice.composition_counts(composition, len(site_z))
  species = np.empty(len(site_z), np.int64)
  species[np.argsort(site_z, kind="stable")] = np.repeat(np.arange(len(counts)), counts)
  return species


RULES = {"per_site": per_site, "counts_in_order": counts_in_order,
         "cell": species_choice.species_from_composition}


def main(argv):
  del argv
  model = inference.TrainedModel.restore(_WORKDIR.value)
  if not (model.config.representation == "repeat" and model.fits_density
          and model.config.model.composition_head):
    raise app.UsageError("needs a repeat model with a composition head, read off the density")
  spec = model.spec
  min_site_z = model.config.eval.min_site_z if _MIN_SITE_Z.value is None else _MIN_SITE_Z.value
  source = datasets.split_source(model.config.dataset, _SPLIT.value)
  count = min(_NUM.value, len(source))
  fitted = []  # (true structure, (site Z, fractional sites, basis) or None, composition)
  for begin in range(0, count, _BATCH_SIZE.value):
    batch = [datasets.record_to_crystal(source[i])
             for i in range(begin, min(begin + _BATCH_SIZE.value, count))]
    grids = model.voxelize(batch)
    mean, _ = model.encode(grids["density"], composition=grids["composition"])
    decoded = model.decode(mean)
    for index, crystal in enumerate(batch):
      fit = density_fit.DensityFit(decoded["density"][index], spec.box, spec.sigma, spec.cutoff)
      basis = density_fit.lattice_from_density(fit.density, fit.box)
      if basis is None and "lattice" in decoded:
        basis = lattice_recovery.usable_lattice(decoded["lattice"][index], fit.box)
      sites = None if basis is None else density_fit.find_sites(fit, basis, min_z=min_site_z)
      fitted.append((crystal.to_structure(), sites, decoded["composition"][index]))
    print(f"fitted {len(fitted)}/{count}", flush=True)
  matcher = metrics.structure_matcher()
  print(f"\n| rule | σ | match ({count} {_SPLIT.value} crystals) |\n|---|---|---|")
  for name, rule in RULES.items():
    for sigma in ([None] if name == "counts_in_order" else map(float, _SIGMAS.value)):
      hits = 0
      for true, sites, composition in fitted:
        if sites is None or len(sites[0]) == 0:
          continue
        z, frac, basis = sites
        rebuilt = reconstruction.structure_from_sites(basis, rule(z, composition, sigma), frac,
                                                       min_distance=0.5)
        if rebuilt.valid:
          with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hits += bool(matcher.fit(rebuilt.structure, true))
      print(f"| {name} | {'—' if sigma is None else sigma} | {hits / count:.1%} |")


if __name__ == "__main__":
  process_settings.apply()
  app.run(main)
