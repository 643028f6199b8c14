"""Exports a training workdir's latest checkpoint as a small pretrained workdir.

    python launch/export_pretrained.py --workdir=runs/perov5_repeat --out=pretrained/perov5_repeat

With `--config=configs/repeat.py:cpu` the export carries that config instead of the checkpoint's
(e.g. to ship newer evaluation settings); it must build the same model.

Writes OUT/checkpoints/<step>/ (the state with the Adam moments reset to zero, which compress to
almost nothing, and the config), OUT/metrics.jsonl and OUT/learning_curves.png. OUT restores like
any workdir (`inference.TrainedModel.restore`, every `--mode`), and training resumes from it
with fresh Adam moments. The exported config names no directory of this machine (dataset path,
data dir and `init_from` are cleared).
"""

import pathlib
import shutil

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from crystal_vae import checkpoints
from crystal_vae import learning_curves
from crystal_vae import train

_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_OUT = flags.DEFINE_string("out", None, "The pretrained workdir to write (must not exist).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional: the config to save instead of the checkpoint's (same model).")
flags.mark_flags_as_required(["workdir", "out"])


def _shapes(config) -> list:
  abstract = jax.eval_shape(lambda: train.create_train_state(config, jax.random.key(0)))
  return [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(abstract.params)]


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value)
  if out.exists():
    raise app.UsageError(f"{out} exists; remove it first")
  source = checkpoints.checkpoint_manager(_WORKDIR.value, read_only=True)
  config = checkpoints.restore_config(source)
  abstract = jax.eval_shape(lambda: train.create_train_state(config, jax.random.key(0)))
  _, state = checkpoints.restore_state(source, abstract)
  state = state.replace(opt_state=jax.tree.map(jnp.zeros_like, state.opt_state))
  if _CONFIG.value is not None:
    if _shapes(_CONFIG.value) != _shapes(config):
      raise app.UsageError("--config builds a different model than the checkpoint's config")
    config = _CONFIG.value
  # A shipped config names no directory of this machine: without one, every mode reads the
  # embedded perov_5 (or the dataset given with --config.dataset.path).
  config.dataset.path, config.dataset.data_dir, config.init_from = "", "", ""
  step = int(state.step)
  target = checkpoints.checkpoint_manager(out, max_to_keep=1)
  checkpoints.save(target, step, state, config)
  checkpoints.wait_until_written(target)
  shutil.copy(pathlib.Path(_WORKDIR.value) / "metrics.jsonl", out / "metrics.jsonl")
  learning_curves.draw(out)
  size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
  print(f"exported step {step} of {_WORKDIR.value} to {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
  app.run(main)
