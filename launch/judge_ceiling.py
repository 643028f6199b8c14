"""What a judge can give at all: the success rates it gives to crystals that ARE in the best
percent of a property.

Takes the validation crystals of a workdir's dataset whose true property lies in the best
`--percent`% of the training split's values (lowest for `--direction=minimize`), reads each from
its own CIF with the judge (`optimize.read_properties`, in the pose the judge knows best), and
prints the judge's mean and SR5 / SR10 / SR15 over them: the ceiling of `--mode=optimize`'s
success rates under that judge, since a perfect optimiser returns such crystals.

  python launch/judge_ceiling.py --workdir=pretrained/perov5_repeat \
    --judge=pretrained/perov5_unit_cell --num=150
"""

from absl import app
from absl import flags
import numpy as np

from crystal_vae import generation
from crystal_vae import inference
from crystal_vae import optimize
from crystal_vae import process_settings
from crystal_vae import quiet_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "the optimised model's workdir", required=True)
_JUDGE = flags.DEFINE_string("judge", None, "the judge's workdir", required=True)
_PROPERTY = flags.DEFINE_string("property", "", "a property of the heads; '' = the first")
_DIRECTION = flags.DEFINE_enum("direction", "minimize", list(optimize.DIRECTIONS), "")
_PERCENT = flags.DEFINE_float("percent", 5.0, "the best percent of the training values")
_NUM = flags.DEFINE_integer("num", 150, "at most this many such validation crystals")


def main(argv):
  del argv
  process_settings.apply()
  quiet_logging.install()
  model = inference.TrainedModel.restore(_WORKDIR.value)
  judge = optimize.independent_judge(model, _JUDGE.value)
  name = model.config.model.properties[optimize.property_index(model, _PROPERTY.value)]
  training = np.array([c.properties.get(name, np.nan)
                       for c in generation.split_crystals(model.config, "train", -1)])
  training = training[np.isfinite(training)]
  minimize = _DIRECTION.value == "minimize"
  threshold = np.percentile(training, _PERCENT.value if minimize else 100 - _PERCENT.value)
  best = [c for c in generation.split_crystals(model.config, "validation", -1)
          if np.isfinite(c.properties.get(name, np.nan))
          and (c.properties[name] <= threshold if minimize else c.properties[name] >= threshold)]
  best = best[:_NUM.value]
  judged = optimize.read_properties(judge, [c.to_structure() for c in best],
                                    optimize.property_index(judge, name))
  true = np.array([c.properties[name] for c in best])
  rates = optimize.success_rates(judged, training, _DIRECTION.value)
  print(f"{len(best)} validation crystals in the best {_PERCENT.value:g}% of {name}"
        f" (true mean {true.mean():.3f}): judged mean {np.nanmean(judged):.3f},"
        f" MAE {np.nanmean(np.abs(judged - true)):.3f}")
  print(f"  SR5 {rates['sr5']:.2f}  SR10 {rates['sr10']:.2f}  SR15 {rates['sr15']:.2f}"
        f"  (judge: {_JUDGE.value})")


if __name__ == "__main__":
  app.run(main)
