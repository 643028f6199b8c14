"""Metrics to JSON lines and TensorBoard event files (tensorboardX: no TensorFlow needed)."""

import json
import pathlib
from collections.abc import Mapping

import jax
import numpy as np
import tensorboardX


class MetricWriter:
  """Appends `{"step": s, "split": name, **metrics}` lines to `metrics.jsonl` and event files.

  Only process 0 writes, so multi-host runs do not clobber each other's files.
  """

  def __init__(self, workdir: str | pathlib.Path):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / "metrics.jsonl", "a")
    self._tensorboard = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self._active:
      return
    values = {key: float(np.asarray(value)) for key, value in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      self._tensorboard.add_scalar(f"{split}/{key}", value, int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tensorboard.close()
