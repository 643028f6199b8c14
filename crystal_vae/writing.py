"""Writing results: rebuilt crystals as CIF files (and why the other samples are none, in
invalid.csv), and summaries as strict JSON."""

from __future__ import annotations

import csv
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Protocol

from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter


class Rebuilt(Protocol):
  """What `write_cifs` reads of a rebuilt sample (`reconstruction.Reconstruction`): a crystal, or
  none and why."""

  @property
  def structure(self) -> Structure | None:
    ...

  @property
  def reason(self) -> str | None:
    ...

  @property
  def detail(self) -> str:
    ...

  @property
  def valid(self) -> bool:
    ...


def to_cif(structure: Structure) -> str:
  """CIF text of a structure (pymatgen `CifWriter`)."""
  return str(CifWriter(structure))


def write_cifs(reconstructions: Sequence[Rebuilt], ids: Sequence[str],
               directory: str | pathlib.Path) -> tuple[int, int]:
  """Writes `<id>.cif` for each valid reconstruction and `invalid.csv` (id, reason, detail) for the
  rest; returns (valid, invalid) counts."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  invalid = []
  for reconstruction, name in zip(reconstructions, ids, strict=True):
    if reconstruction.valid:
      (directory / f"{name}.cif").write_text(to_cif(reconstruction.structure))
    else:
      invalid.append((name, reconstruction.reason, reconstruction.detail))
  with open(directory / "invalid.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["id", "reason", "detail"])
    writer.writerows(invalid)
  return len(reconstructions) - len(invalid), len(invalid)


def _finite_or_none(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {key: _finite_or_none(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(item) for item in value]
  return value


def write_json(path: pathlib.Path, results: dict) -> None:
  """Strict JSON (NaN/inf -> null), sorted keys."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_finite_or_none(results), indent=2, sort_keys=True))
