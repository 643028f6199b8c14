"""Reading crystals: CIF text or files -> `Crystal` records, with named rejections.

A `Crystal` is the plain-numpy form every other module works with: the lattice (rows are the
lattice vectors, Å), fractional coordinates wrapped into [0, 1), atomic numbers, an id and
numeric properties. Anything that cannot become a usable `Crystal` raises `RejectedCrystal`
carrying one of the `REASONS` below, so batch jobs can skip and count bad entries.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import pathlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pymatgen.core import DummySpecies, Lattice, Structure
from pymatgen.io.cif import CifParser

UNPARSABLE = "unparsable_cif"
DISORDERED = "disordered"
NO_ATOMS = "no_atoms"
Z_ABOVE_MAX = "z_above_max"
CELL_TOO_LARGE = "cell_too_large"
TOO_MANY_ATOMS = "too_many_atoms"
DEGENERATE_CELL = "degenerate_cell"
ATOMS_TOO_CLOSE = "atoms_too_close"
REASONS = (UNPARSABLE, DISORDERED, NO_ATOMS, Z_ABOVE_MAX, CELL_TOO_LARGE, TOO_MANY_ATOMS,
           DEGENERATE_CELL, ATOMS_TOO_CLOSE)

# No real crystal has lattice planes closer than this (Å; the shortest lattice vector is at least
# as long), or two atoms closer than CDVAE's structural-validity distance.
MIN_PLANE_SPACING = 1.0
MIN_ATOM_DISTANCE = 0.5


class RejectedCrystal(ValueError):
  """A crystal that cannot be used; `reason` is one of `REASONS`."""

  def __init__(self, crystal_id: str, reason: str, detail: str):
    super().__init__(f"{crystal_id}: {reason}: {detail}")
    self.crystal_id = crystal_id
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class CrystalLimits:
  """What a crystal must satisfy to be voxelised: the paper keeps cells shorter than the box."""

  box: float = 10.0
  max_z: int = 100
  max_atoms: int = 64


@dataclasses.dataclass(frozen=True)
class Crystal:
  """One ordered crystal: lattice rows in Å, fractional coordinates in [0, 1)."""

  id: str
  lattice: np.ndarray
  frac_coords: np.ndarray
  atomic_numbers: np.ndarray
  properties: Mapping[str, float] = dataclasses.field(default_factory=dict)

  @property
  def num_atoms(self) -> int:
    return int(self.atomic_numbers.shape[0])

  def to_structure(self) -> Structure:
    return Structure(Lattice(self.lattice), [int(z) for z in self.atomic_numbers],
                     self.frac_coords)


def crystal_from_structure(structure: Structure, crystal_id: str,
                           limits: CrystalLimits = CrystalLimits(),
                           properties: Mapping[str, float] | None = None) -> Crystal:
  """Checks `structure` against `limits` and converts it; raises `RejectedCrystal`."""
  if len(structure) == 0:
    raise RejectedCrystal(crystal_id, NO_ATOMS, "the structure has no sites")
  if not structure.is_ordered:
    raise RejectedCrystal(crystal_id, DISORDERED,
                          "a site has partial occupancy or mixed species")
  _check_geometry(structure, crystal_id)
  longest = max(structure.lattice.abc)
  if not longest < limits.box:
    raise RejectedCrystal(crystal_id, CELL_TOO_LARGE,
                          f"longest cell side {longest:.3f} Å is not < the {limits.box} Å box")
  if len(structure) > limits.max_atoms:
    raise RejectedCrystal(crystal_id, TOO_MANY_ATOMS,
                          f"{len(structure)} atoms > max_atoms={limits.max_atoms}")
  dummies = sorted({str(site.specie) for site in structure if isinstance(site.specie, DummySpecies)})
  if dummies:
    raise RejectedCrystal(crystal_id, UNPARSABLE, f"non-element species {', '.join(dummies)}")
  numbers = np.array([site.specie.Z for site in structure], dtype=np.int32)
  if numbers.max() > limits.max_z:
    raise RejectedCrystal(crystal_id, Z_ABOVE_MAX,
                          f"Z={numbers.max()} > max_z={limits.max_z}")
  frac = np.mod(structure.frac_coords, 1.0)
  frac[frac >= 1.0] = 0.0  # np.mod can round -1e-17 up to exactly 1.0
  # Lattice orientation is arbitrary; use pymatgen's (and CIF's) standard one from a,b,c,α,β,γ
  # so that the unrotated placements and the unit-cell lattice head agree on it.
  lattice = Lattice.from_parameters(*structure.lattice.parameters).matrix
  return Crystal(id=crystal_id,
                 lattice=np.asarray(lattice, dtype=np.float64),
                 frac_coords=frac.astype(np.float64),
                 atomic_numbers=numbers,
                 properties=dict(properties or {}))


def _check_geometry(structure: Structure, crystal_id: str) -> None:
  """Rejects a cell that is flat, left-handed (a negative length) or not finite, and atoms that
  overlap (periodic images included)."""
  matrix = structure.lattice.matrix
  parameters = ", ".join(f"{value:.4g}" for value in structure.lattice.parameters)
  if not np.all(np.isfinite(matrix)) or np.linalg.det(matrix) <= 0.0:
    raise RejectedCrystal(crystal_id, DEGENERATE_CELL,
                          f"the cell (a, b, c, α, β, γ = {parameters}) has no positive volume: "
                          "a negative or zero length, or vectors in one plane")
  volume = abs(np.linalg.det(matrix))
  spacing = min(volume / np.linalg.norm(np.cross(matrix[i - 2], matrix[i - 1]))
                for i in range(3))
  if spacing < MIN_PLANE_SPACING:
    raise RejectedCrystal(crystal_id, DEGENERATE_CELL,
                          f"lattice planes {spacing:.4g} Å apart (< {MIN_PLANE_SPACING} Å; "
                          f"a, b, c, α, β, γ = {parameters})")
  if len(structure) > 1:
    distances = structure.distance_matrix
    np.fill_diagonal(distances, np.inf)
    first, second = np.unravel_index(np.argmin(distances), distances.shape)
    if distances[first, second] < MIN_ATOM_DISTANCE:
      raise RejectedCrystal(
          crystal_id, ATOMS_TOO_CLOSE,
          f"sites {first} ({structure[first].specie}) and {second} ({structure[second].specie}) "
          f"are {distances[first, second]:.4g} Å apart (periodic minimum; < "
          f"{MIN_ATOM_DISTANCE} Å)")


def structure_from_cif(cif_text: str, crystal_id: str) -> Structure:
  """Parses the first structure of a CIF text; raises `RejectedCrystal` when it cannot."""
  if not cif_text.strip():
    raise RejectedCrystal(crystal_id, UNPARSABLE, "empty file")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      parser = CifParser(io.StringIO(cif_text), occupancy_tolerance=1.0)
      structures = parser.parse_structures(primitive=False, check_occu=False, on_error="raise")
    except Exception as error:  # pymatgen raises many exception types for bad CIFs.
      first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
      raise RejectedCrystal(crystal_id, UNPARSABLE, first_line[:200]) from error
  if not structures:
    raise RejectedCrystal(crystal_id, UNPARSABLE, "no structure found in the CIF")
  return structures[0]


def crystal_from_cif(cif_text: str, crystal_id: str, limits: CrystalLimits = CrystalLimits(),
                     properties: Mapping[str, float] | None = None) -> Crystal:
  """CIF text -> `Crystal`; raises `RejectedCrystal` with the reason."""
  return crystal_from_structure(structure_from_cif(cif_text, crystal_id), crystal_id, limits,
                                properties)


def read_cif_file(path: str | pathlib.Path, limits: CrystalLimits = CrystalLimits()) -> Crystal:
  """Reads one CIF file; its id is the file name without extension."""
  path = pathlib.Path(path)
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as error:
    raise RejectedCrystal(str(path), UNPARSABLE, f"cannot read the file: {error}") from error
  return crystal_from_cif(text, path.stem, limits)


def property_values(crystal_or_record: Crystal | Mapping[str, Any], names: Sequence[str]
                    ) -> np.ndarray:
  """The named numeric properties of a crystal or stored record (its `properties` JSON) as
  float32 (P,), NaN where the crystal has no value."""
  if isinstance(crystal_or_record, Crystal):
    properties = crystal_or_record.properties
  else:
    text = crystal_or_record["properties"]
    properties = json.loads(text.decode() if isinstance(text, bytes) else text)
  values = [properties.get(name) for name in names]
  return np.array([np.nan if value is None else value for value in values], np.float32)


def pad_crystal(crystal_or_record: Crystal | Mapping[str, Any], max_atoms: int,
                properties: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """One crystal as `lattice`, `frac_coords`, `atomic_numbers`, `atom_mask` padded to max_atoms
  (and, if named, its `properties`: NaN where missing)."""
  if isinstance(crystal_or_record, Crystal):
    lattice = crystal_or_record.lattice
    frac_coords = crystal_or_record.frac_coords
    atomic_numbers = crystal_or_record.atomic_numbers
  else:
    lattice = crystal_or_record["lattice"]
    frac_coords = crystal_or_record["frac_coords"]
    atomic_numbers = crystal_or_record["atomic_numbers"]
  num_atoms = len(atomic_numbers)
  if num_atoms > max_atoms:
    raise ValueError(f"a crystal has {num_atoms} atoms > max_atoms={max_atoms}; build the "
                     "dataset with the same max_atoms as the pipeline")
  padded = {
      "lattice": np.asarray(lattice, dtype=np.float32).reshape(3, 3),
      "frac_coords": np.zeros((max_atoms, 3), np.float32),
      "atomic_numbers": np.zeros((max_atoms,), np.int32),
      "atom_mask": np.arange(max_atoms) < num_atoms,
  }
  padded["frac_coords"][:num_atoms] = np.asarray(frac_coords).reshape(-1, 3)
  padded["atomic_numbers"][:num_atoms] = atomic_numbers
  if properties:
    padded["properties"] = property_values(crystal_or_record, properties)
  return padded


def stack_crystals(structures: Sequence[Crystal], max_atoms: int = 0) -> dict[str, np.ndarray]:
  """A batch of crystals padded to max(max_atoms, their largest atom count)."""
  max_atoms = max([max_atoms] + [crystal.num_atoms for crystal in structures])
  padded = [pad_crystal(crystal, max_atoms) for crystal in structures]
  return {key: np.stack([p[key] for p in padded]) for key in padded[0]}


def numeric_properties(row: Mapping[str, str], exclude: Iterable[str]) -> dict[str, float]:
  """The finite numeric columns of a CSV row (other than `exclude`) as floats."""
  excluded = set(exclude)
  properties = {}
  for key, value in row.items():
    if key in excluded or key is None or value is None:
      continue
    try:
      number = float(value)
    except ValueError:
      continue
    if math.isfinite(number):
      properties[key] = number
  return properties


class RejectionLog:
  """Counts and lists skipped entries so that a batch job can report them at the end."""

  def __init__(self):
    self.kept = 0
    self.rejected: list[RejectedCrystal] = []

  def keep(self) -> None:
    self.kept += 1

  def reject(self, error: RejectedCrystal) -> None:
    self.rejected.append(error)

  def counts(self) -> dict[str, int]:
    return dict(collections.Counter(error.reason for error in self.rejected))

  def summary(self) -> str:
    counts = self.counts()
    by_reason = ", ".join(f"{reason}={counts[reason]}" for reason in REASONS if reason in counts)
    return f"kept {self.kept}, skipped {len(self.rejected)}" + (f" ({by_reason})" if by_reason else "")

  def write_csv(self, path: str | pathlib.Path) -> None:
    """Writes `id,reason,detail` for each skipped entry."""
    with open(path, "w", newline="") as handle:
      writer = csv.writer(handle)
      writer.writerow(["id", "reason", "detail"])
      for error in self.rejected:
        writer.writerow([error.crystal_id, error.reason, error.detail])
