"""crystal_vae: a continuous latent space of 3-D crystal structures (JAX/Flax)."""

import ctypes
import importlib.metadata
import os
import sys

# On CPU, jaxlib 0.10 hands convolutions to YNNPACK by default; XLA's own convolutions run this
# model's (depth-sum) 2-D convolutions several times faster: the paper model's train step 2.5x
# (README, "Model speed on CPU"). YNNPACK keeps the dots. XLA reads XLA_FLAGS once, when its
# first backend starts, so this takes effect when crystal_vae is imported before any JAX
# computation; a value the user set wins, and other jaxlib versions (which may not know the
# flag: an unknown one aborts XLA) are left alone.
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def _ynnpack_for_dots_only() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  try:
    supported = importlib.metadata.version("jaxlib").startswith("0.10.")
  except importlib.metadata.PackageNotFoundError:
    supported = False
  if supported and _YNN_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --{_YNN_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT".strip()


_ynnpack_for_dots_only()


# XLA allocates a step's activations afresh each step, and glibc hands large freed blocks back to
# the OS (mmap / munmap, per-thread arenas trimmed), so every step page-faults them in again:
# 17k faults and ~15% of the `cpu` model's CPU train step (README, "Model speed on CPU").
# Importing crystal_vae therefore has glibc keep freed memory for reuse: one arena, no mmap'd
# blocks, no trimming (the process keeps its peak; it recurs every step anyway).
# CRYSTAL_VAE_KEEP_FREED_MEMORY=0 leaves malloc as it is.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
  """Has glibc's malloc keep freed memory for reuse (see above); whether it took effect."""
  if sys.platform != "linux" or os.environ.get("CRYSTAL_VAE_KEEP_FREED_MEMORY") == "0":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  return all(mallopt(parameter, value) == 1 for parameter, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


keep_freed_memory()
