"""Adds or replaces a head of a trained model, fitted on its frozen latent space, in minutes.

    python launch/fit_head.py --workdir=pretrained/perov5_repeat --out=runs/perov5_heat \
      --head=property --properties=heat_all
    python launch/fit_head.py --workdir=pretrained/perov5_repeat --out=runs/perov5_composition \
      --head=composition

Writes OUT, a workdir with WORKDIR's checkpoint plus the head (`crystal_vae/head_fit.py`), and
prints the fit's validation figures. Every mode then runs on OUT, e.g. `--mode=evaluate`.
"""

from absl import app
from absl import flags

from crystal_vae import head_fit
from crystal_vae import process_settings

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained model's workdir.")
_OUT = flags.DEFINE_string("out", None, "The workdir to write (must not exist).")
_HEAD = flags.DEFINE_enum("head", "property", ["property", "composition"],
                          "A property head (added) or the composition head (replaced).")
_PROPERTIES = flags.DEFINE_list("properties", [], "--head=property: dataset properties, by name.")
_HIDDEN = flags.DEFINE_list("hidden", ["512", "512"], "--head=composition: hidden widths.")
_DROPOUT = flags.DEFINE_float("dropout_rate", 0.3, "--head=composition: dropout of hidden units.")
_NOISE = flags.DEFINE_float("posterior_noise", 1.0,
                            "--head=composition: training inputs drawn from the posterior, its "
                            "spread times this (0: the means).")
_MEMBERS = flags.DEFINE_integer("members", 8, "--head=composition: MLPs in the ensemble, each "
                               "fitted alone (seeds seed, seed + 1, ...).")
_STEPS = flags.DEFINE_integer("steps", None, "Adam steps (default: 3000 property, 12000 "
                              "composition).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Adam's learning rate.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Latents per step.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and minibatch seed.")
_LIMIT = flags.DEFINE_integer("limit", 0, "If > 0, only the first crystals of each split.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  common = dict(learning_rate=_LEARNING_RATE.value, batch_size=_BATCH_SIZE.value,
                seed=_SEED.value, limit=_LIMIT.value)
  try:
    if _HEAD.value == "property":
      if not _PROPERTIES.value:
        raise ValueError("--head=property needs --properties")
      summary = head_fit.fit_property_head(_WORKDIR.value, _OUT.value, _PROPERTIES.value,
                                           steps=_STEPS.value or 3000, **common)
    else:
      summary = head_fit.fit_composition_head(
          _WORKDIR.value, _OUT.value, hidden=[int(width) for width in _HIDDEN.value],
          dropout_rate=_DROPOUT.value, posterior_noise=_NOISE.value, members=_MEMBERS.value,
          steps=_STEPS.value or 12000, **common)
  except (FileExistsError, ValueError) as error:
    raise app.UsageError(str(error)) from None
  print(f"wrote {_OUT.value} (head fitted on {summary['num_train']} training crystals)")
  if _HEAD.value == "property":
    for name, values in summary["properties"].items():
      print(f"  {name}: validation MAE {values['mae']:.4g} (training mean: "
            f"{values['baseline_mae']:.4g}), R² {values['r2']:.3f} over {values['count']}")
  else:
    members = ", ".join(f"{exact:.1%}" for exact in summary["composition_exact_members"])
    print(f"  validation compositions exact: {summary['composition_exact']:.1%} (members alone: "
          f"{members}; the source's head: {summary['composition_exact_before']:.1%}) over "
          f"{summary['num_validation']}")


if __name__ == "__main__":
  process_settings.apply()
  app.run(main)
