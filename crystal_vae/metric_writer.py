"""Metrics to JSON lines and TensorBoard event files (tensorboardX: no TensorFlow needed)."""

import json
import pathlib
from collections.abc import Mapping

import jax
import numpy as np
import tensorboardX


def read_records(path: pathlib.Path) -> list[dict]:
  """The records of a metrics.jsonl, in file order; a line cut short (a run killed or a disk full
  while it was written) is left out."""
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


class MetricWriter:
  """Appends `{"step": s, "split": name, **metrics}` lines to `metrics.jsonl` and event files.

  Only process 0 writes, so multi-host runs do not clobber each other's files. A run resumed
  at `start_step` first drops the lines of later steps (written before an interruption), so each
  step appears once.
  """

  def __init__(self, workdir: str | pathlib.Path, start_step: int = 0):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    if path.exists():
      kept = [record for record in read_records(path) if record["step"] <= start_step]
      path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    self._jsonl = open(path, "a")
    self._tensorboard_dir = workdir / "tensorboard"
    self._tensorboard = None  # opened at the first write: a finished run re-run adds no file

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self._active:
      return
    if self._tensorboard is None:
      self._tensorboard = tensorboardX.SummaryWriter(str(self._tensorboard_dir))
    values = {key: float(np.asarray(value)) for key, value in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      self._tensorboard.add_scalar(f"{split}/{key}", value, int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      if self._tensorboard is not None:
        self._tensorboard.close()
