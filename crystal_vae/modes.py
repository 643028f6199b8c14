"""The modes, one contract: `run(model, settings, out_dir) -> summary`.

`train` trains (train.py). Every other mode runs on the model restored once from the workdir
(`TrainedModel.for_mode`: the checkpoint's config decides representation, grid, model and
dataset; the command line gives the mode's own settings `config.<section>` and, with
`--config.dataset.*`, another dataset) and writes under `workdir/<folder>/`.
"""

import math
import pathlib
import time

import jax
import ml_collections

from crystal_vae import conditional
from crystal_vae import discriminator
from crystal_vae import evaluate
from crystal_vae import generation
from crystal_vae import inference
from crystal_vae import metric_writer
from crystal_vae import optimize
from crystal_vae import progress
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
    return train_then_rebuild(config, workdir)
  run_mode, section, folder = MODES[mode]
  model = inference.TrainedModel.for_mode(config, workdir, dataset_given=dataset_given)
  out_dir = pathlib.Path(workdir) / folder
  if mode == "evaluate":
    out_dir = out_dir / evaluate.out_dir_name(config.eval)
  return run_mode(model, config[section], out_dir)


def train_then_rebuild(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict | None:
  """Trains; then, with `eval.after_training` > 0, rebuilds that many crystals of `eval.split`
  (which the model did not train on) with the trained model and measures them (`evaluate`);
  ends with a summary of what was made, its headline figures, its files and what to try next."""
  start = time.time()
  state = train.train_and_evaluate(config, workdir)
  if jax.process_index() != 0:
    return None
  workdir = pathlib.Path(workdir)
  results = None
  if config.eval.after_training > 0 and config.eval.split not in ("", "none"):
    settings = ml_collections.ConfigDict(config.eval.to_dict())
    settings.num_batches = math.ceil(config.eval.after_training / settings.batch_size)
    model = inference.TrainedModel.for_mode(config, workdir, dataset_given=False)
    out_dir = workdir / "eval" / evaluate.out_dir_name(settings)
    results = evaluate.evaluate(model, settings, out_dir)
  print(training_summary(config, workdir, int(state.step), time.time() - start, results))
  return results


def training_summary(config: ml_collections.ConfigDict, workdir: pathlib.Path, step: int,
                     seconds: float, results: dict | None) -> str:
  """What a person reads at the end of training."""
  lines = [f"Trained the {config.representation} model on {config.dataset.name} to step {step}"
           f" ({progress.format_duration(seconds)} in this run), workdir {workdir}"]
  evaluations = [record for record in _metric_records(workdir)
                 if record.get("split") == config.eval.split and "mse" in record]
  if evaluations:
    first, last = evaluations[0], evaluations[-1]
    lines.append(f"  {config.eval.split} voxel MSE: {first['mse']:.4f} at step {first['step']}"
                 f" -> {last['mse']:.4f} at step {last['step']}")
  if results is not None:
    lines.append(f"  rebuilt {int(results['num_samples'])} {results['split']} crystals it did not train"
                 f" on: {100 * results['match_rate']:.1f}% match (StructureMatcher stol 0.5,"
                 f" angle_tol 10, ltol 0.3), {100 * results['valid_rate']:.1f}% gave a crystal")
  out_dir = workdir / "eval" / config.eval.split
  lines += ["Files:",
            f"  {workdir / 'checkpoints'}/      the trained model (orbax) and its config",
            f"  {workdir / 'metrics.jsonl'}   losses and evaluations by step;"
            f" learning_curves.png beside it"]
  if results is not None:
    lines += [f"  {out_dir / 'metrics.json'}   the reconstruction figures",
              f"  {out_dir / 'rebuilt.png'}   true vs rebuilt crystals;"
              f" cifs/ and matches.csv beside it"]
  lines += ["Next:",
            f"  python -m crystal_vae.main --workdir={workdir} --mode=sample       # new crystals",
            f"  python -m crystal_vae.main --workdir={workdir} --mode=interpolate  # between two"]
  return "\n".join(lines)


def _metric_records(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return metric_writer.read_records(path)
