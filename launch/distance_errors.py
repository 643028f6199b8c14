"""How far a repeat model's rebuilt atoms are from the true ones, light (Z <= 9) and heavier apart.

    python launch/distance_errors.py --workdir=runs/cpu2 --num=64 [--refine_steps=10]

For each of the first `num` crystals of the split: encode, decode (optionally refining the latent,
`eval.refine_steps`), rebuild the crystal off the decoded density as evaluation does, and pool
each whole in-cube true atom's distance to the nearest rebuilt one (`evaluate`'s comparison).
Prints the median and 75th percentile for all atoms, the light ones (O, N, F: a perovskite's
anions) and the heavier ones.
"""

from absl import app
from absl import flags
import numpy as np

from crystal_vae import datasets
from crystal_vae import evaluate
from crystal_vae import inference
from crystal_vae import metrics
from crystal_vae import process_settings

_WORKDIR = flags.DEFINE_string("workdir", "pretrained/perov5_repeat", "A repeat model's workdir.")
_NUM = flags.DEFINE_integer("num", 64, "Crystals, the first of the split.")
_SPLIT = flags.DEFINE_string("split", "validation", "Dataset split.")
_REFINE_STEPS = flags.DEFINE_integer("refine_steps", 0, "eval.refine_steps for the latent.")
_LIGHT_Z = 9


def main(argv):
  del argv
  model = inference.TrainedModel.restore(_WORKDIR.value)
  if not model.fits_repeat_cube:
    raise app.UsageError("needs a repeat model that reads crystals off the density")
  model.config.eval.refine_steps = _REFINE_STEPS.value
  source = datasets.split_source(model.config.dataset, _SPLIT.value)
  crystals = [datasets.record_to_crystal(source[i]) for i in range(min(_NUM.value, len(source)))]
  _, decoded = model.reconstruct(model.voxelize(crystals, seed=model.config.seed))
  pooled = {"all": [], "light": [], "heavier": []}
  for crystal, rebuilt in zip(crystals, model.to_crystals(decoded)):
    if not rebuilt.valid:
      continue
    true = evaluate.whole_atoms(
        evaluate.true_atoms_in_cube(crystal, model.spec.box, "repeat"), model.spec, False)
    distances = metrics.compare_atoms(
        evaluate.whole_atoms(rebuilt.cube_atoms, model.spec, False), true).true_to_predicted
    light = true.species <= _LIGHT_Z
    pooled["all"].append(distances)
    pooled["light"].append(distances[light])
    pooled["heavier"].append(distances[~light])
  for name, parts in pooled.items():
    values = np.concatenate(parts) if parts else np.zeros(0)
    if values.size:
      print(f"{name:8s} {values.size:5d} atoms: true -> rebuilt median {np.median(values):.3f} A, "
            f"p75 {np.percentile(values, 75):.3f} A")


if __name__ == "__main__":
  process_settings.apply()
  app.run(main)
