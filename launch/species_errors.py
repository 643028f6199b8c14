"""How far the Z fitted on a repeat model's decoded densities is from the true atomic numbers.

    python launch/species_errors.py --workdir=pretrained/perov5_repeat --num=48

For each of the first `num` crystals of the split: encode, decode, read the lattice and the sites
off the decoded density, match each site image in the cube to the true atom within 0.5 Å
(`evaluate.fitted_and_true_z`, Z unrounded), and print the error of the fitted Z (bias, spread,
exact after rounding) per range of the true Z. A bias could be calibrated away; a spread needs a sharper density.
"""

from absl import app
from absl import flags
import numpy as np

from crystal_vae import datasets
from crystal_vae import evaluate
from crystal_vae import inference
from crystal_vae import process_settings

_WORKDIR = flags.DEFINE_string("workdir", "pretrained/perov5_repeat", "A repeat model's workdir.")
_NUM = flags.DEFINE_integer("num", 48, "Crystals, the first of the split.")
_SPLIT = flags.DEFINE_string("split", "validation", "Dataset split.")
_DATASET_PATH = flags.DEFINE_string("dataset_path", "", "Dataset folder, if not the model's.")

Z_RANGES = ((1, 10), (10, 20), (20, 40), (40, 60), (60, 101))


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
  pairs = evaluate.fitted_and_true_z(model, crystals)
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
  process_settings.apply()
  app.run(main)
