"""How far the Z fitted on a repeat model's decoded densities is from the true atomic numbers.

    python launch/species_errors.py --workdir=pretrained/perov5_repeat --num=48

For each of the first `num` crystals of the split: encode, decode, read the lattice and the sites
off the decoded density (`density_fit`, unrounded Z), match each site image in the cube to the
true atom within 0.5 Å, and print the error of the fitted Z (bias, spread, exact after rounding)
per range of the true Z. A bias could be calibrated away; a spread needs a sharper density.
"""

from absl import app
from absl import flags
import numpy as np

from crystal_vae import datasets
from crystal_vae import density_fit
from crystal_vae import evaluate
from crystal_vae import inference

_WORKDIR = flags.DEFINE_string("workdir", "pretrained/perov5_repeat", "A repeat model's workdir.")
_NUM = flags.DEFINE_integer("num", 48, "Crystals, the first of the split.")
_SPLIT = flags.DEFINE_string("split", "validation", "Dataset split.")
_DATASET_PATH = flags.DEFINE_string("dataset_path", "", "Dataset folder, if not the model's.")

Z_RANGES = ((1, 10), (10, 20), (20, 40), (40, 60), (60, 101))


def fitted_and_true_z(model: inference.TrainedModel, crystals: list) -> np.ndarray:
  """(fitted Z, true Z) of every distinct site matched to a true atom within 0.5 Å."""
  grids = model.voxelize(crystals)
  mean, _ = model.encode(grids["density"], composition=grids["composition"])
  decoded = model.decode(mean)
  spec, pairs = model.spec, []
  for crystal, density in zip(crystals, decoded["density"]):
    fit = density_fit.DensityFit(density, spec.box, spec.sigma, spec.cutoff)
    basis = density_fit.lattice_from_density(fit.density, fit.box)
    if basis is None:
      continue
    z, site_frac, basis = density_fit.find_sites(fit, basis, min_z=model.config.eval.min_site_z)
    images = density_fit.images_in_cube(np.arange(z.size), site_frac, basis, fit.box)
    true = evaluate.true_atoms_in_cube(crystal, spec.box, "repeat")
    matched = {}
    for position, site in zip(images.positions, images.species):
      distances = np.linalg.norm(true.positions - position, axis=1)
      if distances.size and distances.min() < spec.species_radius:
        matched[int(site)] = (float(z[site]), int(true.species[np.argmin(distances)]))
    pairs += matched.values()
  return np.array(pairs).reshape(-1, 2)


def main(argv):
  del argv
  model = inference.TrainedModel.restore(_WORKDIR.value)
  if model.config.representation != "repeat" or not model.fits_density:
    raise app.UsageError("needs a repeat model that reads crystals off the density")
  if _DATASET_PATH.value:
    model.config.dataset.path = _DATASET_PATH.value
    model.config.dataset.data_dir = ""
  source = datasets.split_source(model.config.dataset, _SPLIT.value)
  crystals = [datasets.record_to_crystal(source[i]) for i in range(min(_NUM.value, len(source)))]
  pairs = fitted_and_true_z(model, crystals)
  error = pairs[:, 0] - pairs[:, 1]
  exact = np.rint(pairs[:, 0]) == pairs[:, 1]
  print(f"{len(pairs)} sites of {len(crystals)} crystals; exact after rounding {exact.mean():.1%}")
  print("| true Z | sites | mean error | spread (sd) | exact after rounding |")
  print("|---|---|---|---|---|")
  for low, high in Z_RANGES:
    rows = (pairs[:, 1] >= low) & (pairs[:, 1] < high)
    if rows.any():
      print(f"| {low}-{high - 1} | {rows.sum()} | {error[rows].mean():+.2f} | "
            f"{error[rows].std():.2f} | {exact[rows].mean():.0%} |")


if __name__ == "__main__":
  app.run(main)
