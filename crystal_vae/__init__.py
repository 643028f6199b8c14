"""crystal_vae: a continuous latent space of 3-D crystal structures (JAX/Flax)."""

import importlib.metadata
import os

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
