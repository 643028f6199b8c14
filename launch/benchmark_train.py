"""Train-step throughput, FLOPs per sample (XLA cost analysis) and achieved FLOP/s.

    python launch/benchmark_train.py                      # paper and quick models, both conv impls
    python launch/benchmark_train.py --models=paper --batch_size=24 --impls=xla

The step measured is `train.train_step` (forward, backward and Adam update of the β-VAE and the
U-Net) on already-voxelised grids; voxelisation has its own benchmark.
"""

import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from crystal_vae import default_config
from crystal_vae import train

_MODELS = flags.DEFINE_list("models", ["paper", "quick"], "Config variants: paper, quick.")
_IMPLS = flags.DEFINE_list("impls", ["depth_sum", "xla"], "model.conv_impl values to compare.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Samples per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def measure(variant: str, impl: str, batch_size: int, steps: int) -> dict[str, float]:
  config = default_config.get_config("repeat", None if variant == "paper" else variant)
  config.model.conv_impl = impl
  grid = config.voxel.grid
  rng = np.random.default_rng(0)
  batch = {
      "density": jnp.asarray(rng.gamma(0.5, 0.2, (batch_size, grid, grid, grid)), jnp.float32),
      "species": jnp.asarray(rng.integers(0, config.dataset.max_z + 1,
                                          (batch_size, grid, grid, grid)), jnp.int32),
      "lattice": jnp.tile(jnp.eye(3) * 4.0, (batch_size, 1, 1)),
  }
  state = train.create_train_state(config, jax.random.key(0))
  step = jax.jit(lambda s, b, r: train.train_step(s, b, r, config=config))
  start = time.perf_counter()
  compiled = step.lower(state, batch, jax.random.key(1)).compile()
  compile_seconds = time.perf_counter() - start
  state, metrics = compiled(state, batch, jax.random.key(1))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, jax.random.key(1))
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  flops = _flops(compiled)
  return {"samples_per_second": batch_size / seconds, "step_seconds": seconds,
          "gflops_per_sample": flops / batch_size / 1e9,
          "achieved_gflops_per_second": flops / seconds / 1e9,
          "compile_seconds": compile_seconds}


def main(argv):
  del argv
  print(f"devices: {jax.devices()}  cpus: {os.cpu_count()}  machine: {platform.processor() or platform.machine()}"
        f"  jax {jax.__version__}")
  print(f"batch {_BATCH.value}, mean over {_STEPS.value} steps after a warm-up step\n")
  print("| model | conv_impl | samples/s | s/step | GFLOP/sample | achieved GFLOP/s | compile s |")
  print("|---|---|---|---|---|---|---|")
  for variant in _MODELS.value:
    for impl in _IMPLS.value:
      r = measure(variant, impl, _BATCH.value, _STEPS.value)
      print(f"| {variant} | {impl} | {r['samples_per_second']:.2f} | {r['step_seconds']:.3f} |"
            f" {r['gflops_per_sample']:.2f} | {r['achieved_gflops_per_second']:.1f} |"
            f" {r['compile_seconds']:.1f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
