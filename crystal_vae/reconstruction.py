"""Decoded atoms -> crystals (pymatgen `Structure`, CIF), for both voxel representations.

* "repeat": the lattice is read off the periodicity of the decoded atoms. Candidate translations
  are the displacements between atoms of the same species seen from a few reference atoms spread
  over the cube. A candidate is a lattice vector when (almost) every atom whose translate falls
  inside the cube (at least `margin` from its faces) finds an atom of the same species within
  `tolerance` there; the accepted vector is refined to the mean of its matched displacements. The
  basis is the triple of accepted vectors with the smallest volume (then the shortest), which is
  a primitive cell of the lattice they generate; its right-handed Niggli-reduced form is placed in
  pymatgen's standard orientation (`Lattice.from_parameters`). All atoms are then folded into the
  cell and the periodic copies of each site are merged (species: vote over the copies; position:
  mean of the copies relative to a representative, across the cell wrap). Atoms touching a cube
  face are cut by it and get a small weight. A site seen in fewer than `min_site_support` of the
  places inside the cube where the lattice says it should appear is noise and is dropped.
  Nothing assumes where the cell origin is.
* "unit_cell": the lattice (3 x 3, rows) comes from the model's lattice head, oriented as the
  cell lies in the cube; the cell centre sits at the cube centre, so
  cartesian = cube - box / 2 + (a + b + c) / 2. Fractional coordinates are wrapped and atoms that
  coincide periodically are merged.

A decoded sample that cannot become a crystal gives a `Reconstruction` with `structure=None` and
one of `REASONS`, so evaluations count it instead of dropping it.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import pathlib
from collections.abc import Sequence

import numpy as np
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter
from scipy import spatial
from scipy.cluster import hierarchy

from crystal_vae.segmentation import Atoms

NO_ATOMS = "no_atoms"
NO_LATTICE = "no_lattice"
INVALID_LATTICE = "invalid_lattice"
ATOMS_TOO_CLOSE = "atoms_too_close"
REASONS = (NO_ATOMS, NO_LATTICE, INVALID_LATTICE, ATOMS_TOO_CLOSE)

# Weight of atoms touching a cube face (cut by it, so their centres are biased inwards).
_BOUNDARY_WEIGHT = 1e-3


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """A crystal, or `structure=None` with a `reason` from `REASONS` and a human-readable detail."""

  structure: Structure | None
  reason: str | None = None
  detail: str = ""

  @property
  def valid(self) -> bool:
    return self.structure is not None


def _invalid(reason: str, detail: str) -> Reconstruction:
  return Reconstruction(structure=None, reason=reason, detail=detail)


def _merge_sites(lattice: np.ndarray, frac: np.ndarray, species: np.ndarray,
                 weights: np.ndarray, merge_tolerance: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Clusters periodic copies (average linkage on minimum-image distances below
  `merge_tolerance`); returns per site the weighted-vote species, the weighted mean fractional
  position (relative to its heaviest copy, wrapped into [0, 1)) and the cluster id of each copy."""
  if frac.shape[0] == 1:
    return species.copy(), np.mod(frac, 1.0), np.zeros(1, np.int64)
  distances = Lattice(lattice).get_all_distances(frac, frac)
  np.fill_diagonal(distances, 0.0)
  condensed = spatial.distance.squareform(np.minimum(distances, distances.T), checks=False)
  cluster = hierarchy.fcluster(hierarchy.linkage(condensed, "average"), merge_tolerance,
                               criterion="distance") - 1
  site_species, site_frac = [], []
  for site in range(cluster.max() + 1):
    members = np.flatnonzero(cluster == site)
    w = weights[members]
    votes = {}
    for z, weight in zip(species[members], w):
      votes[int(z)] = votes.get(int(z), 0.0) + weight
    site_species.append(max(votes, key=lambda z: (votes[z], z)))
    representative = frac[members[np.argmax(w)]]
    shift = frac[members] - representative
    shift -= np.round(shift)
    site_frac.append(representative + (w[:, None] * shift).sum(axis=0) / w.sum())
  site_frac = np.mod(np.array(site_frac), 1.0)
  site_frac[site_frac >= 1.0] = 0.0
  return np.array(site_species, np.int32), site_frac, cluster


def _structure(lattice: np.ndarray, species: np.ndarray, frac: np.ndarray,
               min_distance: float) -> Reconstruction:
  """Checks interatomic distances and returns the structure in its right-handed Niggli cell,
  standard orientation."""
  structure = Structure(Lattice(lattice), [int(z) for z in species], frac)
  if len(structure) > 1:
    distances = structure.distance_matrix + np.diag(np.full(len(structure), np.inf))
    closest = float(distances.min())
    if closest < min_distance:
      return _invalid(ATOMS_TOO_CLOSE, f"two sites {closest:.3f} Å apart (< {min_distance} Å)")
  reduced = structure.get_reduced_structure("niggli")
  matrix, reduced_frac = reduced.lattice.matrix, reduced.frac_coords
  if np.linalg.det(matrix) < 0:  # Inversion keeps every position and makes the basis right-handed.
    matrix, reduced_frac = -matrix, -reduced_frac
  standard = Lattice.from_parameters(*Lattice(matrix).parameters)
  return Reconstruction(Structure(standard, reduced.species, np.mod(reduced_frac, 1.0)))


def reconstruct_unit_cell(atoms: Atoms, lattice: np.ndarray, box: float, *,
                          merge_tolerance: float = 0.3, min_volume: float = 1.0,
                          min_distance: float = 0.5) -> Reconstruction:
  """Places decoded atoms (cube coordinates) in the cell centred in the cube whose vectors are the
  rows of `lattice` (3, 3), oriented as in the cube (the lattice head's output); merges atoms
  closer than `merge_tolerance` (periodic). A cell of volume < `min_volume` Å³ is invalid.
  """
  if len(atoms) == 0:
    return _invalid(NO_ATOMS, "the species grid has no atoms")
  lattice = np.asarray(lattice, np.float64)
  volume = np.linalg.det(lattice) if np.all(np.isfinite(lattice)) else np.nan
  if not abs(volume) >= min_volume:
    return _invalid(INVALID_LATTICE, f"the cell {np.round(lattice, 3).tolist()} has volume"
                    f" {volume:.3g} Å³ < {min_volume}")
  if volume < 0:  # A left-handed basis: -lattice spans the same points, right-handed.
    lattice = -lattice
  cartesian = atoms.positions - box / 2 + 0.5 * lattice.sum(axis=0)
  frac = np.mod(cartesian @ np.linalg.inv(lattice), 1.0)
  species, site_frac, _ = _merge_sites(lattice, frac, atoms.species, np.ones(len(atoms)),
                                       merge_tolerance)
  return _structure(lattice, species, site_frac, min_distance)


def _inside(points: np.ndarray, box: float, margin: float) -> np.ndarray:
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
    sources = np.flatnonzero(_inside(self.positions + translation, self.box, self.margin))
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
                veto_fraction: float) -> tuple[np.ndarray | None, int]:
  """A basis of the candidates that hold (for at least `min_fraction` of the atoms checked) whose
  lattice holds: no checkable lattice vector n @ basis (|n_k| <= 2) may fail (hold for less than
  `veto_fraction` and miss more than two atoms). A failing one reveals a basis vector that is a
  coincidence seen by few atoms: the least-checked basis vector is removed and the basis chosen
  again. Returns (basis or None, number of candidates that hold)."""
  accepted, checks = [], []
  for translation in candidates:
    fraction, count, refined = check(translation)
    if fraction is not None and fraction >= min_fraction:
      accepted.append(refined)
      checks.append(count)
  vectors, checks = np.array(accepted).reshape(-1, 3), np.array(checks, np.int64)
  num_accepted = vectors.shape[0]
  while True:
    basis = _basis(vectors)
    if basis is None:
      return None, num_accepted
    implied = [check(translation)[:2] for translation in _IMPLIED @ basis]
    # Two misses are allowed: one wrongly decoded atom misses as a source and as a target.
    if all(fraction is None or fraction >= veto_fraction or (1 - fraction) * count < 2.5
           for fraction, count in implied):
      return basis, num_accepted
    in_basis = [int(np.argmin(np.minimum(np.linalg.norm(vectors - row, axis=-1),
                                         np.linalg.norm(vectors + row, axis=-1))))
                for row in basis]
    weakest = min(in_basis, key=lambda index: checks[index])
    vectors, checks = np.delete(vectors, weakest, axis=0), np.delete(checks, weakest)


@dataclasses.dataclass(frozen=True)
class DensityFit:
  """What `fit_sites` needs to refit site species to a (decoded) density grid (G, G, G)
  over the cube: the Gaussian width and how far (Å) outside the cube images still count."""

  density: np.ndarray
  sigma: float
  cutoff: float
  max_z: int


def _rows_times(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
  """(r, i, m) x (q, m) -> (r, i, q), summed over m, as one BLAS matrix product."""
  return (rows.reshape(-1, rows.shape[-1]) @ columns.T).reshape(*rows.shape[:2], -1)


def _least_squares(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
  """argmin_x |matrix x - target|² through the (small) normal equations."""
  gram = matrix.T @ matrix
  return np.linalg.lstsq(gram, matrix.T @ target, rcond=None)[0]


def fit_sites(basis: np.ndarray, site_frac: np.ndarray, box: float, fit: DensityFit,
              iterations: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Atomic numbers, fractional positions and the lattice of a repeat cube's sites, refined by
  least squares on the cube's density.

  The repeat density is M(x) = Σ_s Z_s Σ_n g(x − r_s − n·B) over every periodic image whose
  Gaussian reaches the cube (B: lattice rows), so the fit uses all voxels, including those near
  the faces. It is linear in Z; Gauss-Newton iterations refine the positions r_s and the lattice
  B jointly with Z: positions and lattice read off segmented atoms are off by a few hundredths
  of an Å, which over several periods is enough to move a fitted Z by one. Z is rounded to the
  nearest integer in [1, max_z]. If the fit moves a site or lattice vector by more than 0.5 Å
  it is not trusted and the given geometry is kept (Z then comes from the linear fit alone).
  """
  density = np.asarray(fit.density, np.float64).reshape(-1)
  grid = fit.density.shape[0]
  axis = (np.arange(grid) + 0.5) * (box / grid)
  norm = 1.0 / (fit.sigma ** 3 * (2 * np.pi) ** 1.5)
  corners = np.array(list(itertools.product((-fit.cutoff, box + fit.cutoff), repeat=3)))

  def design(positions: np.ndarray, lattice: np.ndarray, gradients: bool):
    """Per site Σ_n g (V,); with `gradients` also d/dr (V, 3) and d/dB (V, 3, 3) per unit Z.

    g(x − p) = gx gy gz is separable, so a sum over images is one matrix product of the x
    factors with the outer products of the y and z factors; d/dp_d replaces factor d by
    g_d (x_d − p_d) / σ², and p = r + n·B gives dp_d/dB_id = n_i.
    """
    inverse = np.linalg.inv(lattice)
    value, d_position, d_lattice = [], [], []
    for position in positions:
      span = (corners - position) @ inverse
      low, high = np.floor(span.min(axis=0)), np.ceil(span.max(axis=0))
      shifts = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(low, high)],
                                    indexing="ij"), axis=-1).reshape(-1, 3)
      places = position + shifts @ lattice
      near = np.all((places > -fit.cutoff) & (places < box + fit.cutoff), axis=1)
      places, shifts = places[near], shifts[near]
      delta = [axis[:, None] - places[None, :, d] for d in range(3)]
      factor = [np.exp(-dd ** 2 / (2 * fit.sigma ** 2)) * norm ** (1 / 3) for dd in delta]
      yz = (factor[1][:, None, :] * factor[2][None, :, :]).reshape(-1, len(places))
      if not gradients:
        value.append((factor[0] @ yz.T).reshape(-1))
        continue
      derivative = [f * dd / fit.sigma ** 2 for f, dd in zip(factor, delta)]
      weights = np.concatenate([np.ones((1, len(places))), shifts.T])  # (4, images): 1, n_i
      # Rows: g, then per direction d the derivative weighted by 1, n_0, n_1, n_2.
      x_rows = np.concatenate([factor[0][None], derivative[0][None] * weights[:, None]])
      by_x = _rows_times(x_rows, yz)  # (5, G, G*G)
      dy_z = (derivative[1][:, None, :] * factor[2][None, :, :]).reshape(-1, len(places))
      y_dz = (factor[1][:, None, :] * derivative[2][None, :, :]).reshape(-1, len(places))
      weighted_x = factor[0][None] * weights[:, None]  # (4, G, images)
      by_y = _rows_times(weighted_x, dy_z)
      by_z = _rows_times(weighted_x, y_dz)
      value.append(by_x[0].reshape(-1))
      per_direction = np.stack([by_x[1:], by_y, by_z]).reshape(3, 4, -1)  # (d, 1 + i, V)
      d_position.append(per_direction[:, 0].T)
      d_lattice.append(per_direction[:, 1:].transpose(2, 1, 0))  # (V, i, d)
    value = np.stack(value, axis=1)
    if not gradients:
      return value
    return value, np.stack(d_position, axis=1), np.stack(d_lattice, axis=1)

  lattice = np.asarray(basis, np.float64)
  positions = np.asarray(site_frac, np.float64) @ lattice
  z = _least_squares(design(positions, lattice, False), density)
  fitted_positions, fitted_lattice, count = positions.copy(), lattice.copy(), len(z)
  for _ in range(iterations):
    value, d_position, d_lattice = design(fitted_positions, fitted_lattice, True)
    jacobian = np.concatenate([
        value, (d_position * z[None, :, None]).reshape(density.size, -1),
        np.einsum("vsij,s->vij", d_lattice, z).reshape(density.size, 9)], axis=1)
    step = _least_squares(jacobian, density - value @ z)
    z = z + step[:count]
    fitted_positions = fitted_positions + step[count:4 * count].reshape(-1, 3)
    fitted_lattice = fitted_lattice + step[4 * count:].reshape(3, 3)
  trusted = (np.all(np.isfinite(fitted_positions)) and np.all(np.isfinite(fitted_lattice))
             and np.abs(fitted_positions - positions).max() <= 0.5
             and np.abs(fitted_lattice - lattice).max() <= 0.5)
  if trusted:
    positions, lattice = fitted_positions, fitted_lattice
  z = _least_squares(design(positions, lattice, False), density)
  species = np.clip(np.rint(z), 1, fit.max_z).astype(np.int32)
  return species, np.mod(positions @ np.linalg.inv(lattice), 1.0), lattice


def reconstruct_repeat(atoms: Atoms, box: float, *, tolerance: float = 0.3, margin: float = 0.7,
                       min_checks: int = 3, min_fraction: float = 0.95,
                       veto_fraction: float = 0.95, merge_tolerance: float = 0.5,
                       min_site_support: float = 0.5,
                       min_distance: float = 0.5, num_references: int = 9,
                       density_fit: DensityFit | None = None) -> Reconstruction:
  """Recovers the lattice and the cell's sites from decoded atoms of a repeat cube.

  Args:
    atoms: decoded atoms in cube coordinates (any origin; unrotated or rotated alike).
    box: cube side, Å.
    tolerance: how close (Å) a translated atom must land to an atom of its species.
    margin: translates closer than this (Å) to a cube face are not checked (they may be cut).
    min_checks: a translation needs at least this many checkable atoms.
    min_fraction: ... and this fraction of them must land on an atom of their species.
    veto_fraction: a basis is rejected when one of its short lattice vectors holds for less
      (and misses more than two atoms).
    merge_tolerance: copies of one site are clustered with average linkage at this distance (Å).
    min_site_support: sites found in fewer than this fraction of their expected places inside
      the cube are dropped.
    min_distance: sites closer than this (Å, periodic) make the sample invalid.
    num_references: reference atoms (1 to 9) whose displacements give the candidate translations.
    density_fit: if given, the sites' species and positions are fitted to this density
      (`fit_sites`) instead of voted and averaged over the atoms.
  """
  if len(atoms) == 0:
    return _invalid(NO_ATOMS, "the species grid has no atoms")
  interior = ~atoms.on_boundary
  positions, species = atoms.positions[interior], atoms.species[interior]
  if positions.shape[0] < 2:
    return _invalid(NO_LATTICE, f"{positions.shape[0]} atoms away from the cube faces")
  check = _TranslationCheck(positions, species, box, tolerance, margin, min_checks)
  candidates = _candidate_translations(positions, species, box, tolerance, num_references)
  basis, num_accepted = _find_basis(check, candidates, min_fraction, veto_fraction)
  if basis is None:
    return _invalid(NO_LATTICE, f"{num_accepted} of {candidates.shape[0]} candidate translations "
                    "hold; they do not give a consistent 3-D lattice")
  frac = atoms.positions @ np.linalg.inv(basis)
  weights = np.where(atoms.on_boundary, _BOUNDARY_WEIGHT, 1.0)
  site_species, site_frac, cluster = _merge_sites(basis, np.mod(frac, 1.0), atoms.species,
                                                  weights, merge_tolerance)
  # Support: copies found inside the checked region / places there where the lattice puts the site.
  checked = _inside(atoms.positions, box, margin) & interior
  found = np.bincount(cluster[checked], minlength=site_species.shape[0])
  span = np.ceil(box * np.abs(np.linalg.inv(basis)).sum(axis=0)).astype(int) + 1
  shifts = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in span], indexing="ij"),
                    axis=-1).reshape(-1, 3)
  places = (site_frac[:, None, :] + shifts[None]) @ basis
  expected = _inside(places, box, margin).sum(axis=1)
  keep = (expected == 0) | (found >= min_site_support * expected)
  if not keep.any():
    return _invalid(NO_ATOMS, "no site is supported by its periodic copies")
  site_species, site_frac = site_species[keep], site_frac[keep]
  if density_fit is not None:
    site_species, site_frac, basis = fit_sites(basis, site_frac, box, density_fit)
  return _structure(basis, site_species, site_frac, min_distance)


def to_cif(structure: Structure) -> str:
  """CIF text of a structure (pymatgen `CifWriter`)."""
  return str(CifWriter(structure))


def write_cifs(reconstructions: Sequence[Reconstruction], ids: Sequence[str],
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
