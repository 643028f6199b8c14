"""The lattice of a crystal from its decoded atoms, or a given lattice checked on them.

A repeat cube's lattice (`repeat_lattice`) is read off the periodicity of its decoded atoms.
Candidate translations are the displacements between atoms of the same species seen from a few
reference atoms spread over the cube. A candidate is a lattice vector when (almost) every atom
whose translate falls inside the cube (at least `margin` from its faces) finds an atom of the
same species within `tolerance` there; the accepted vector is refined to the mean of its matched
displacements. The basis is the triple of accepted vectors with the smallest volume (then the
shortest), which is a primitive cell of the lattice they generate. When the atoms give no
lattice (a cell side too long for the 10 Å cube to show the atoms twice), the density's own
translations give it, and when neither does, or they give a cell of another volume (a
pseudo-translation), a model's lattice head gives it; each checked on the atoms. Nothing
assumes where the cell origin is. A lattice head's cell is also checked on its own
(`usable_lattice`, `cell_problem`).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import spatial
from scipy.cluster import hierarchy

from crystal_vae import crystals
from crystal_vae import density_fit

# A cell vector longer than this many cube sides cannot be drawn in (nor read off) the cube.
_MAX_CELL_BOXES = 3


def cell_problem(lattice: np.ndarray, box: float, min_volume: float) -> str | None:
  """Why the cell whose vectors are the rows of `lattice` (3, 3) cannot be a crystal's, or None:
  a volume below `min_volume` Å³ (or none), a vector longer than three cube sides, or lattice
  planes closer than `crystals.MIN_PLANE_SPACING` (no crystal's; pymatgen takes minutes to
  reduce such a cell)."""
  volume = np.linalg.det(lattice) if np.all(np.isfinite(lattice)) else np.nan
  if not abs(volume) >= min_volume:
    return (f"the cell {np.round(lattice, 3).tolist()} has volume {volume:.3g} Å³ <"
            f" {min_volume}")
  longest = np.linalg.norm(lattice, axis=-1).max()
  if longest > _MAX_CELL_BOXES * box:
    return (f"a cell vector is {longest:.3g} Å long, more than {_MAX_CELL_BOXES} cube sides"
            f" ({_MAX_CELL_BOXES * box:g} Å)")
  spacing = abs(volume) / np.linalg.norm(np.cross(lattice[[1, 2, 0]], lattice[[2, 0, 1]]),
                                         axis=-1).max()
  if spacing < crystals.MIN_PLANE_SPACING:
    return (f"lattice planes {spacing:.3g} Å apart (< {crystals.MIN_PLANE_SPACING} Å) in the cell"
            f" {np.round(lattice, 3).tolist()}")
  return None


def inside_cube(points: np.ndarray, box: float, margin: float) -> np.ndarray:
  """Whether each point (..., 3) lies in the cube [0, box]^3, `margin` Å or more from its faces."""
  return np.all((points >= margin) & (points <= box - margin), axis=-1)


def _candidate_translations(positions: np.ndarray, species: np.ndarray, box: float,
                            tolerance: float, num_references: int) -> np.ndarray:
  """Cluster means of same-species displacements from reference atoms near the cube centre and
  its 8 octant centres (so long translations are seen from a corner), one of each ± pair."""
  targets = np.array([[box / 2] * 3] + list(itertools.product((box / 4, 3 * box / 4), repeat=3)))
  references = np.unique(np.argmin(
      np.linalg.norm(positions[None] - targets[:num_references, None], axis=-1), axis=1))
  displacements = np.concatenate([
      positions[species == species[r]] - positions[r] for r in references])
  displacements = displacements[np.linalg.norm(displacements, axis=-1) > tolerance]
  # One of each ± pair: first non-negligible component positive.
  sign = np.sign(np.where(np.abs(displacements) > tolerance, displacements, 0.0))
  first = sign[np.arange(sign.shape[0]), np.argmax(sign != 0, axis=1)]
  displacements = displacements * np.where(first < 0, -1.0, 1.0)[:, None]
  if displacements.shape[0] < 2:
    return displacements
  cluster = hierarchy.fcluster(hierarchy.linkage(displacements, "single"), tolerance,
                               criterion="distance")
  return np.array([displacements[cluster == c].mean(axis=0) for c in np.unique(cluster)])


class _TranslationCheck:
  """Whether a translation maps the decoded atoms onto atoms of the same species."""

  def __init__(self, positions: np.ndarray, species: np.ndarray, box: float, tolerance: float,
               margin: float, min_checks: int):
    self.positions, self.species = positions, species
    self.box, self.tolerance, self.margin = box, tolerance, margin
    self.min_checks = min_checks
    self.tree = spatial.cKDTree(positions)

  def __call__(self, translation: np.ndarray) -> tuple[float | None, int, np.ndarray]:
    """(the fraction of checked atoms that land on an atom of their species, None when fewer
    than min_checks atoms can be checked; the number checked; the mean matched displacement)."""
    sources = np.flatnonzero(inside_cube(self.positions + translation, self.box, self.margin))
    if sources.size < self.min_checks:
      return None, sources.size, translation
    distance, nearest = self.tree.query(self.positions[sources] + translation,
                                        distance_upper_bound=self.tolerance)
    found = np.isfinite(distance)
    found[found] &= self.species[nearest[found]] == self.species[sources[found]]
    if not found.any():
      return 0.0, sources.size, translation
    refined = (self.positions[nearest[found]] - self.positions[sources[found]]).mean(axis=0)
    return found.mean(), sources.size, refined


def _basis(vectors: np.ndarray, max_vectors: int = 24) -> np.ndarray | None:
  """The non-degenerate triple of the shortest vectors with the smallest volume, then the
  smallest total length, right-handed; None when they span fewer than three dimensions."""
  vectors = vectors[np.argsort(np.linalg.norm(vectors, axis=-1))][:max_vectors]
  if vectors.shape[0] < 3:
    return None
  triples = np.array(list(itertools.combinations(range(vectors.shape[0]), 3)))
  matrices = vectors[triples]
  volumes = np.abs(np.linalg.det(matrices))
  lengths = np.linalg.norm(matrices, axis=-1)
  proper = volumes > 0.2 * lengths.prod(axis=-1)
  if not proper.any():
    return None
  smallest = volumes[proper].min()
  options = np.flatnonzero(proper & (volumes < 1.1 * smallest))
  basis = matrices[options[np.argmin(lengths[options].sum(axis=-1))]]
  if np.linalg.det(basis) < 0:
    basis = basis * np.array([[1.0], [1.0], [-1.0]])
  return basis


# Integer combinations n (one of each ± pair) of basis vectors checked for a consistent lattice.
_IMPLIED = np.array([n for n in itertools.product((-2, -1, 0, 1, 2), repeat=3)
                     if n > (0, 0, 0)], np.float64)


def _find_basis(check: _TranslationCheck, candidates: np.ndarray, min_fraction: float,
                veto_fraction: float) -> tuple[np.ndarray | None, np.ndarray]:
  """A basis of the candidates that hold (for at least `min_fraction` of the atoms checked) whose
  lattice holds: no checkable lattice vector n @ basis (|n_k| <= 2) may fail (hold for less than
  `veto_fraction` and miss more than two atoms). A failing one reveals a basis vector that is a
  coincidence seen by few atoms: the least-checked basis vector is removed and the basis chosen
  again. Returns (basis or None, the candidates that hold, refined)."""
  accepted, checks = [], []
  for translation in candidates:
    fraction, count, refined = check(translation)
    if fraction is not None and fraction >= min_fraction:
      accepted.append(refined)
      checks.append(count)
  vectors, checks = np.array(accepted).reshape(-1, 3), np.array(checks, np.int64)
  accepted = vectors
  while True:
    basis = _basis(vectors)
    if basis is None:
      return None, accepted
    if _lattice_holds(check, basis, veto_fraction):
      return basis, accepted
    in_basis = [int(np.argmin(np.minimum(np.linalg.norm(vectors - row, axis=-1),
                                         np.linalg.norm(vectors + row, axis=-1))))
                for row in basis]
    weakest = min(in_basis, key=lambda index: checks[index])
    vectors, checks = np.delete(vectors, weakest, axis=0), np.delete(checks, weakest)


def _lattice_holds(check: _TranslationCheck, basis: np.ndarray, veto_fraction: float) -> bool:
  """No checkable lattice vector n @ basis (|n_k| <= 2) fails (holds for less than
  `veto_fraction` and misses more than two atoms: one wrongly decoded atom misses as a source
  and as a target)."""
  implied = [check(translation)[:2] for translation in _IMPLIED @ basis]
  return all(fraction is None or fraction >= veto_fraction or (1 - fraction) * count < 2.5
             for fraction, count in implied)


def _checked_basis(check: _TranslationCheck, basis: np.ndarray | None, accepted: np.ndarray,
                   veto_fraction: float, snap: float) -> np.ndarray | None:
  """A basis from elsewhere (the density's translations, a lattice head) checked and refined on
  the atoms, if no atom contradicts it: a vector within `snap` (Å) of a translation that holds
  (`accepted`, either sign) becomes that translation; another that enough atoms can check must
  hold for `veto_fraction` of them (refined to their mean); the rest (too long to be checked) are
  kept as they are. The lattice must then hold (`_lattice_holds`)."""
  if basis is None:
    return None
  vectors = []
  for row in basis:
    if accepted.shape[0]:
      signed = np.concatenate([accepted, -accepted])
      distances = np.linalg.norm(signed - row, axis=-1)
      if distances.min() <= snap:
        vectors.append(signed[np.argmin(distances)])
        continue
    fraction, _, refined = check(row)
    if fraction is not None and fraction < veto_fraction:
      return None
    vectors.append(row if fraction is None else refined)
  basis = np.array(vectors)
  volume = np.linalg.det(basis)
  lengths = np.linalg.norm(basis, axis=-1)
  if abs(volume) < 0.2 * lengths.prod():  # degenerate, e.g. two rows snapped to one translation
    return None
  if volume < 0:
    basis = basis * np.array([[1.0], [1.0], [-1.0]])
  return basis if _lattice_holds(check, basis, veto_fraction) else None


def usable_lattice(lattice: np.ndarray | None, box: float) -> np.ndarray | None:
  """A given lattice (a lattice head's output) as a right-handed basis, or None where it cannot
  be a crystal's: not finite, a vector shorter than 1 Å or longer than 3 boxes, or flat."""
  if lattice is None:
    return None
  lattice = np.asarray(lattice, np.float64)
  if not np.all(np.isfinite(lattice)):
    return None
  lengths = np.linalg.norm(lattice, axis=-1)
  volume = np.linalg.det(lattice)
  if (lengths.min() < 1.0 or lengths.max() > _MAX_CELL_BOXES * box
      or abs(volume) < 0.2 * lengths.prod()):
    return None
  return lattice if volume > 0 else -lattice


def _volumes_differ(basis: np.ndarray, lattice: np.ndarray, tolerance: float) -> bool:
  """Whether the cells' volumes differ by more than `tolerance`, relative to `lattice`'s."""
  return abs(abs(np.linalg.det(basis)) / abs(np.linalg.det(lattice)) - 1) > tolerance


def repeat_lattice(positions: np.ndarray, species: np.ndarray, box: float, *,
                   density: np.ndarray | None, lattice: np.ndarray | None, lattice_snap: float,
                   volume_tolerance: float, tolerance: float, margin: float, min_checks: int,
                   min_fraction: float, veto_fraction: float, num_references: int
                   ) -> tuple[np.ndarray | None, str]:
  """The lattice basis (3, 3), rows, right-handed, of a repeat cube's decoded atoms away from its
  faces (`positions` in cube coordinates, `species`), or None and why not. The arguments are
  `reconstruction.reconstruct_repeat`'s."""
  lattice = usable_lattice(lattice, box)
  if positions.shape[0] < 2 and density is None and lattice is None:
    return None, f"{positions.shape[0]} atoms away from the cube faces"
  check = _TranslationCheck(positions, species, box, tolerance, margin, min_checks)
  candidates = (_candidate_translations(positions, species, box, tolerance, num_references)
                if positions.shape[0] >= 2 else np.zeros((0, 3)))
  basis, accepted = _find_basis(check, candidates, min_fraction, veto_fraction)
  if basis is None and density is not None:
    basis = _checked_basis(check, density_fit.lattice_from_density(density, box), accepted,
                           veto_fraction, tolerance)
  if lattice is not None and (basis is None or _volumes_differ(basis, lattice, volume_tolerance)):
    # A cell of another volume than the one given: a pseudo-translation (or a missed one).
    given = _checked_basis(check, lattice, accepted, veto_fraction, lattice_snap)
    basis = basis if given is None else given
  if basis is None:
    return None, (f"{accepted.shape[0]} of {candidates.shape[0]} candidate translations hold;"
                  " they do not give a consistent 3-D lattice"
                  + (" (nor does the lattice given)" if lattice is not None else ""))
  return basis, ""
