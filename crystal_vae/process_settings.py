"""Process-wide settings for speed on the CPU, applied by the entry points, never on import.

`apply()` is called by the command line (`crystal_vae/main.py`), the benchmarks in `launch/` and
the test suite, before any JAX computation:

* XLA_FLAGS gains `--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`
  (jaxlib 0.10 only). jaxlib 0.10 hands CPU convolutions to YNNPACK by default; XLA's own
  convolutions are several times faster on this model's (depth-sum) 2-D convolutions (the paper
  model's train step 2.6x), and YNNPACK keeps the dots. XLA reads XLA_FLAGS once, when its first backend starts.
  A value the user set for this flag wins; other jaxlib versions, which may not know the flag
  (an unknown one aborts XLA), are left alone.
* glibc's malloc keeps freed memory for reuse: one arena, no mmap'd blocks, no trimming. XLA
  allocates a step's activations afresh each step, and glibc would hand the large freed blocks
  back to the OS and fault them in again every step (~15% of the `cpu` model's CPU train step).
  The process keeps its peak memory, which recurs every step anyway.

Environment switches: CRYSTAL_VAE_PROCESS_SETTINGS=0 makes `apply()` change nothing;
CRYSTAL_VAE_KEEP_FREED_MEMORY=0 leaves malloc as it is.
"""

import ctypes
import importlib.metadata
import os
import sys

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters


def ynnpack_for_dots_only() -> bool:
  """Adds the YNNPACK flag to XLA_FLAGS (see above); whether it was added."""
  flags = os.environ.get("XLA_FLAGS", "")
  try:
    supported = importlib.metadata.version("jaxlib").startswith("0.10.")
  except importlib.metadata.PackageNotFoundError:
    supported = False
  if not supported or YNN_FLAG in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} --{YNN_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT".strip()
  return True


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


def apply() -> None:
  """Both settings, unless CRYSTAL_VAE_PROCESS_SETTINGS=0; call before any JAX computation."""
  if os.environ.get("CRYSTAL_VAE_PROCESS_SETTINGS") == "0":
    return
  ynnpack_for_dots_only()
  keep_freed_memory()
