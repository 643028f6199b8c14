"""The modes, one contract: `run(model, settings, out_dir) -> summary`.

`train` trains (train.py). Every other mode runs on the model restored once from the workdir
(`TrainedModel.for_mode`: the checkpoint's config decides representation, grid, model and
dataset; the command line gives the mode's own settings `config.<section>` and, with
`--config.dataset.*`, another dataset) and writes under `workdir/<folder>/`.
"""

import pathlib

import ml_collections

from crystal_vae import conditional
from crystal_vae import discriminator
from crystal_vae import evaluate
from crystal_vae import generation
from crystal_vae import inference
from crystal_vae import optimize
from crystal_vae import train

# mode -> (run(model, settings, out_dir), its settings section of the config, its folder)
MODES = {
    "evaluate": (evaluate.evaluate, "eval", "eval"),
    "sample": (generation.sample, "sample", "sample"),
    "interpolate": (generation.interpolate, "interpolate", "interpolate"),
    "traverse": (generation.traverse, "traverse", "traverse"),
    "conditional": (conditional.conditional, "conditional", "conditional"),
    "discriminator": (discriminator.discriminate, "discriminator", "discriminator"),
    "optimize": (optimize.optimize, "optimize", "optimize"),
}
NAMES = ["train", *MODES]


def run(mode: str, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        dataset_given: bool = False) -> dict | None:
  """Trains, or runs `mode` on the model restored from `workdir`; returns its summary."""
  if mode == "train":
    train.train_and_evaluate(config, workdir)
    return None
  run_mode, section, folder = MODES[mode]
  model = inference.TrainedModel.for_mode(config, workdir, dataset_given=dataset_given)
  out_dir = pathlib.Path(workdir) / folder
  if mode == "evaluate":
    out_dir = out_dir / evaluate.out_dir_name(config.eval)
  return run_mode(model, config[section], out_dir)
