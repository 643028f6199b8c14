"""Adds a property head to a trained model: fitted on its frozen latent space, in minutes.

    python launch/fit_property_head.py --workdir=pretrained/perov5_repeat \
      --out=runs/perov5_heat --properties=heat_all

Writes OUT, a workdir with WORKDIR's checkpoint plus the head (`property_fit.py`), and prints
the validation MAE and R² beside the training mean's. Every mode then runs on OUT, e.g.
`--mode=evaluate` (MAE, R², parity plot) and `--mode=optimize`.
"""

from absl import app
from absl import flags

from crystal_vae import property_fit

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained model's workdir.")
_OUT = flags.DEFINE_string("out", None, "The workdir to write (must not exist).")
_PROPERTIES = flags.DEFINE_list("properties", None, "Numeric dataset properties, by name.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Adam steps.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Adam's learning rate.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Latents per step.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and minibatch seed.")
_LIMIT = flags.DEFINE_integer("limit", 0, "If > 0, only the first crystals of each split.")
flags.mark_flags_as_required(["workdir", "out", "properties"])


def main(argv):
  del argv
  try:
    summary = property_fit.fit_property_head(
        _WORKDIR.value, _OUT.value, _PROPERTIES.value, steps=_STEPS.value,
        learning_rate=_LEARNING_RATE.value, batch_size=_BATCH_SIZE.value, seed=_SEED.value,
        limit=_LIMIT.value)
  except (FileExistsError, ValueError) as error:
    raise app.UsageError(str(error)) from None
  print(f"wrote {_OUT.value} (head fitted on {summary['num_train']} training crystals)")
  for name, values in summary["properties"].items():
    print(f"  {name}: validation MAE {values['mae']:.4g} (training mean: "
          f"{values['baseline_mae']:.4g}), R² {values['r2']:.3f} over {values['count']}")


if __name__ == "__main__":
  app.run(main)
