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
  `reconstruct_repeat_from_density` instead reads the lattice, the sites and their atomic
  numbers off the decoded density itself, by least squares (`density_fit`), with no segmentation.
  When neither the atoms nor the density's translations give a lattice (a cell side too long for
  the 10 Å cube to show the atoms twice), or they give a cell of another volume (a
  pseudo-translation), a model's lattice head gives it, checked on the atoms.
* "unit_cell": the lattice (3 x 3, rows) comes from the model's lattice head, oriented as the
  cell lies in the cube; the cell centre sits at the cube centre, so
  cartesian = cube - box / 2 + (a + b + c) / 2. Fractional coordinates are wrapped and atoms that
  coincide periodically are merged.

A decoded sample that cannot become a crystal gives a `Reconstruction` with `structure=None` and
one of `REASONS`, so evaluations count it instead of dropping it: whatever a model decodes (a
density of NaN, inf, zeros or noise; a site's Z beyond the periodic table; a cell of hundreds of
atoms or of no size) gives a crystal or a reason, never an exception.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter
from scipy import spatial
from scipy.cluster import hierarchy

from crystal_vae import crystals
from crystal_vae import density_fit
from crystal_vae import segmentation
from crystal_vae import symmetry
from crystal_vae.segmentation import Atoms

NO_ATOMS = "no_atoms"
NO_LATTICE = "no_lattice"
INVALID_LATTICE = "invalid_lattice"
ATOMS_TOO_CLOSE = "atoms_too_close"
Z_OUT_OF_RANGE = "z_out_of_range"
NON_FINITE = segmentation.NON_FINITE
TOO_MANY_ATOMS = segmentation.TOO_MANY_ATOMS
REASONS = (NO_ATOMS, NO_LATTICE, INVALID_LATTICE, ATOMS_TOO_CLOSE, Z_OUT_OF_RANGE, NON_FINITE,
           TOO_MANY_ATOMS)

# The elements pymatgen knows: H (1) to Og (118).
MAX_Z = 118
# The most sites of a rebuilt cell (`segmentation.MAX_ATOMS`).
MAX_ATOMS = segmentation.MAX_ATOMS
# A repeat cube holding more atoms per Å³ than this is noise: five times diamond's 0.18, the
# densest solid's (the repeat reconstruction of 5,000 atoms took 13 to 44 s).
_MAX_CUBE_ATOMS_PER_VOLUME = 1.0
# A cell vector longer than this many cube sides cannot be drawn in (nor read off) the cube.
_MAX_CELL_BOXES = 3

# Weight of atoms touching a cube face (cut by it, so their centres are biased inwards).
_BOUNDARY_WEIGHT = 1e-3


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """A crystal, or `structure=None` with a `reason` from `REASONS` and a human-readable detail."""

  structure: Structure | None
  reason: str | None = None
  detail: str = ""
  # The crystal's atoms in the cube it was read from, in cube coordinates, with the crystal's
  # species: a repeat cube read off the density (`reconstruct_repeat_from_density`), its images
  # (empty when there is no crystal); a unit cell, the decoded atoms, each with its site's species.
  cube_atoms: Atoms | None = None

  @property
  def valid(self) -> bool:
    return self.structure is not None


def _invalid(reason: str, detail: str, cube_atoms: Atoms | None = None) -> Reconstruction:
  return Reconstruction(structure=None, reason=reason, detail=detail, cube_atoms=cube_atoms)


def _unreadable_atoms(atoms: Atoms, max_atoms: int) -> Reconstruction | None:
  """Why a cube's atoms cannot be read as a crystal, or None: the cube could not be read
  (`Atoms.reason`), has no atoms or more than `max_atoms`."""
  if atoms.reason is not None:
    return _invalid(atoms.reason, atoms.detail)
  if len(atoms) == 0:
    return _invalid(NO_ATOMS, "the species grid has no atoms")
  if len(atoms) > max_atoms:
    return _invalid(TOO_MANY_ATOMS, f"{len(atoms)} atoms in the cube (more than {max_atoms})")
  return None


def _non_finite(name: str, values: np.ndarray | None, cube_atoms: Atoms | None = None
                ) -> Reconstruction | None:
  """NON_FINITE naming `name` when `values` (if given) hold a NaN or infinity, else None."""
  detail = None if values is None else segmentation.non_finite_detail(values, name)
  return None if detail is None else _invalid(NON_FINITE, detail, cube_atoms)


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


def structure_from_sites(lattice: np.ndarray, species: np.ndarray, frac: np.ndarray,
                         min_distance: float, max_atoms: int = MAX_ATOMS) -> Reconstruction:
  """Checks the sites (at most `max_atoms`, each an element) and their distances and returns the
  structure in its right-handed Niggli cell, standard orientation."""
  species = np.asarray(species)
  if len(species) > max_atoms:
    return _invalid(TOO_MANY_ATOMS, f"{len(species)} sites in the cell (more than {max_atoms})")
  outside = species[(species < 1) | (species > MAX_Z)]
  if outside.size:
    return _invalid(Z_OUT_OF_RANGE, f"a site's Z of {int(outside[0])} is no element's (1 to"
                    f" {MAX_Z})")
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


# Atoms read off a unit cell's density: periodic copies closer than this (Å) are one atom.
FITTED_MERGE_TOLERANCE = 1.5


def reconstruct_unit_cell(atoms: Atoms, lattice: np.ndarray, box: float, *,
                          composition: np.ndarray | None = None,
                          site_z_sigma: float | None = None, fitted_z: bool = False,
                          symprec: float = 0.0, min_volume: float = 1.0,
                          min_distance: float = 0.5, max_atoms: int = MAX_ATOMS
                          ) -> Reconstruction:
  """Places decoded atoms (cube coordinates) in the cell centred in the cube whose vectors are the
  rows of `lattice` (3, 3), oriented as in the cube (the lattice head's output); merges atoms
  closer than 0.3 Å (periodic). A cell of volume < `min_volume` Å³, with lattice planes closer
  than `crystals.MIN_PLANE_SPACING` (no crystal's; pymatgen takes minutes to reduce such a cell)
  or a vector longer than three cube sides is invalid, and so are more than `max_atoms` atoms or
  sites. With a predicted
  `composition` (fractions per Z) the species are `species_from_composition` of the segmented
  ones (with `site_z_sigma`). With `symprec` > 0 the cell is symmetrised
  (`symmetry.symmetrize`) and each decoded atom moves with its site.

  `fitted_z`: the atoms' species are Z fitted to the density (`segmentation.atoms_from_density`).
  An atom on a face of the cell (frac 0 or 1: perov_5's corner and face sites) is decoded as a
  share of it at each of the two faces; so copies closer than `FITTED_MERGE_TOLERANCE` (periodic)
  are one atom, its Z the sum of theirs and its position their Z-weighted mean.
  """
  unreadable = _unreadable_atoms(atoms, max_atoms) or _non_finite("composition", composition)
  if unreadable is not None:
    return unreadable
  lattice = np.asarray(lattice, np.float64)
  volume = np.linalg.det(lattice) if np.all(np.isfinite(lattice)) else np.nan
  if not abs(volume) >= min_volume:
    return _invalid(INVALID_LATTICE, f"the cell {np.round(lattice, 3).tolist()} has volume"
                    f" {volume:.3g} Å³ < {min_volume}")
  longest = np.linalg.norm(lattice, axis=-1).max()
  if longest > _MAX_CELL_BOXES * box:
    return _invalid(INVALID_LATTICE, f"a cell vector is {longest:.3g} Å long, more than"
                    f" {_MAX_CELL_BOXES} cube sides ({_MAX_CELL_BOXES * box:g} Å)")
  spacing = abs(volume) / np.linalg.norm(np.cross(lattice[[1, 2, 0]], lattice[[2, 0, 1]]),
                                         axis=-1).max()
  if spacing < crystals.MIN_PLANE_SPACING:
    return _invalid(INVALID_LATTICE, f"lattice planes {spacing:.3g} Å apart (< "
                    f"{crystals.MIN_PLANE_SPACING} Å) in the cell {np.round(lattice, 3).tolist()}")
  if volume < 0:  # A left-handed basis: -lattice spans the same points, right-handed.
    lattice = -lattice
  cartesian = atoms.positions - box / 2 + 0.5 * lattice.sum(axis=0)
  frac = np.mod(cartesian @ np.linalg.inv(lattice), 1.0)
  if fitted_z:
    weights = atoms.species.astype(np.float64)
    _, site_frac, cluster = _merge_sites(lattice, frac, atoms.species, weights,
                                         FITTED_MERGE_TOLERANCE)
    species = np.bincount(cluster, weights=weights).round().astype(np.int32)
  else:
    species, site_frac, cluster = _merge_sites(lattice, frac, atoms.species,
                                               np.ones(len(atoms)), 0.3)
  if composition is not None:
    species = species_from_composition(species, composition, site_z_sigma)
  positions = atoms.positions
  if symprec > 0:
    new_lattice, new_frac = symmetry.symmetrize(lattice, species, site_frac, symprec)
    site_shift = new_frac - site_frac
    site_shift -= np.round(site_shift)
    cell_frac = cartesian @ np.linalg.inv(lattice) + site_shift[cluster]
    positions = cell_frac @ new_lattice + box / 2 - 0.5 * new_lattice.sum(axis=0)
    lattice, site_frac = new_lattice, new_frac
  result = structure_from_sites(lattice, species, site_frac, min_distance, max_atoms)
  return dataclasses.replace(result, cube_atoms=dataclasses.replace(
      atoms, species=species[cluster], positions=positions))


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


def reconstruct_repeat(atoms: Atoms, box: float, *, density: np.ndarray | None = None,
                       lattice: np.ndarray | None = None, lattice_snap: float = 1.0,
                       volume_tolerance: float = 0.2,
                       tolerance: float = 0.3, margin: float = 0.7,
                       min_checks: int = 3, min_fraction: float = 0.95,
                       veto_fraction: float = 0.95, merge_tolerance: float = 0.5,
                       min_site_support: float = 0.5,
                       min_distance: float = 0.5, num_references: int = 9,
                       symprec: float = 0.0, max_atoms: int = MAX_ATOMS) -> Reconstruction:
  """Recovers the lattice and the cell's sites from decoded atoms of a repeat cube.

  Args:
    atoms: decoded atoms in cube coordinates (any origin; unrotated or rotated alike).
    box: cube side, Å.
    density: the cube's (decoded) density: when the atoms give no lattice (a cell side too long
      for enough atoms to be seen twice), the lattice of the density's own translations
      (`density_fit.lattice_from_density`, every voxel shift at once) is used, if it holds for
      the atoms (the same checks).
    lattice: a lattice (3, 3), rows oriented as in the cube (a lattice head's output), used when
      neither the atoms nor the density give one (a cell side too long for the cube to show its
      translation), or give a cell whose volume differs from it by more than `volume_tolerance`
      (relative: a pseudo-translation, or a translation not seen); checked on the atoms in the
      same way.
    lattice_snap: a `lattice` vector within this distance (Å) of a translation the atoms show
      becomes that translation.
    volume_tolerance: see `lattice`.
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
    symprec: > 0: the crystal is symmetrised within this tolerance (Å, `symmetry.symmetrize`).
    max_atoms: a cell of more sites is invalid (`TOO_MANY_ATOMS`), and so is a cube of more
      atoms than one per Å³ (noise: five times the densest solid's).
  """
  cube_limit = int(_MAX_CUBE_ATOMS_PER_VOLUME * box ** 3)
  unreadable = _unreadable_atoms(atoms, cube_limit) or _non_finite("density", density)
  if unreadable is not None:
    return unreadable
  lattice = usable_lattice(lattice, box)
  interior = ~atoms.on_boundary
  positions, species = atoms.positions[interior], atoms.species[interior]
  if positions.shape[0] < 2 and density is None and lattice is None:
    return _invalid(NO_LATTICE, f"{positions.shape[0]} atoms away from the cube faces")
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
    return _invalid(NO_LATTICE, f"{accepted.shape[0]} of {candidates.shape[0]} candidate "
                    "translations hold; they do not give a consistent 3-D lattice"
                    + (" (nor does the lattice given)" if lattice is not None else ""))
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
  site_species = site_species[keep]
  basis, site_frac = symmetry.symmetrize(basis, site_species, site_frac[keep], symprec)
  return structure_from_sites(basis, site_species, site_frac, min_distance, max_atoms)


def composition_counts(fractions: np.ndarray, num_atoms: int) -> np.ndarray:
  """Fractions per Z (C,) -> integer atom counts summing to `num_atoms`: floor(n·f) each, and
  the atoms left to the largest remainders (Z = 0, "no atom", gets none)."""
  fractions = np.asarray(fractions, np.float64).copy()
  fractions[0] = 0.0
  scaled = fractions / max(fractions.sum(), 1e-12) * num_atoms
  counts = np.floor(scaled).astype(np.int64)
  left = num_atoms - int(counts.sum())
  counts[np.argsort(counts - scaled, kind="stable")[:left]] += 1
  return counts


def composition_is_exact(fractions: np.ndarray, counts: np.ndarray) -> bool:
  """Whether predicted `fractions` per Z, rounded to the crystal's atom count
  (`composition_counts`), are its true `counts` per Z."""
  counts = np.asarray(counts)
  return bool(np.array_equal(composition_counts(fractions, int(counts.sum())), counts))


def species_from_composition(site_z: np.ndarray, composition: np.ndarray,
                             site_z_sigma: float | None) -> np.ndarray:
  """The sites' elements, chosen for the whole cell at once from the predicted composition
  (fractions f per Z) and the Z the density (or the segmenter) gives each site: the elements
  that maximise

      -Σ_sites (z_i - Z_i)² / (2 σ²)  -  Σ_elements c_Z log(c_Z / (n f_Z))

  (the sites' Gaussian likelihood, σ = `site_z_sigma`, and n times the KL divergence of the
  cell's composition c / n from the predicted one), with f floored at 1e-6 so that an element
  the head missed still wins where the density is clearly its own. For given counts the best
  assignment gives the elements to the sites in order of Z, so a dynamic programme over the
  elements (in order of Z: those within 6σ of a site's Z, and those with f > 1e-3) and the
  sites (in order of their Z) finds the optimum. On the shipped perov_5 model this rebuilt 45%
  of 256 validation crystals right against 25% for the best element of each site alone and 39%
  for the composition's rounded counts given in order of Z (docs/evaluation.md, "Species from the
  composition and the density")."""
  site_z = np.asarray(site_z, np.float64)
  if site_z_sigma is None or not site_z_sigma > 0:
    raise ValueError(f"site_z_sigma must be > 0, got {site_z_sigma}")
  order = np.argsort(site_z, kind="stable")
  z = site_z[order]
  n = z.size
  fractions = np.maximum(np.asarray(composition, np.float64)[1:], 1e-6)
  elements = np.arange(1, len(composition))
  near = np.abs(elements[:, None] - z[None, :]).min(axis=1, initial=np.inf) <= 6 * site_z_sigma
  candidates = elements[near | (fractions > 1e-3)]
  counts = np.arange(n + 1)
  # best[k]: the best score of the first k sites (in order of Z) given the elements so far;
  # taken[j, k]: how many sites element j takes when the first k are given.
  best = np.full(n + 1, -np.inf)
  best[0] = 0.0
  taken = np.zeros((len(candidates), n + 1), np.int64)
  for j, element in enumerate(candidates):
    squared = np.concatenate([[0.0], np.cumsum((z - element) ** 2)])
    log_ratio = np.log(np.maximum(counts, 1) / (n * fractions[element - 1]))
    prior = counts * log_ratio  # c log(c / (n f)), 0 for c = 0
    updated = best.copy()
    for k in range(1, n + 1):
      c = counts[1:k + 1]  # element j takes the sites k - c .. k - 1
      scores = best[k - c] - (squared[k] - squared[k - c]) / (2 * site_z_sigma ** 2) - prior[c]
      if scores.max() > updated[k]:
        updated[k], taken[j, k] = scores.max(), c[np.argmax(scores)]
    best = updated
  species = np.empty(n, np.int32)
  k = n
  for j in range(len(candidates) - 1, -1, -1):
    if taken[j, k] and k:
      species[order[k - taken[j, k]:k]] = candidates[j]
      k -= taken[j, k]
  return species


# `atom_count`: how close to a whole number the density's count of atoms must be to be used.
_COUNT_TOLERANCE = 0.3


def atom_count(site_z: np.ndarray, composition: np.ndarray) -> int | None:
  """The number of atoms in the cell that the density and a predicted composition (fractions
  per Z) agree on: the sites' fitted Z summed (the cell's electrons, which spurious or split
  sites barely change) over the composition's mean Z, when that is within 0.3 of a whole
  number (else None: the two disagree, e.g. a lattice of half the true cell)."""
  fractions = np.asarray(composition, np.float64).copy()
  fractions[0] = 0.0
  mean_z = float(np.dot(fractions, np.arange(fractions.size)) / max(fractions.sum(), 1e-12))
  if mean_z <= 0:
    return None
  estimate = float(np.sum(site_z)) / mean_z
  count = int(round(estimate))
  return count if count >= 1 and abs(estimate - count) < _COUNT_TOLERANCE else None


def reconstruct_repeat_from_density(fit: density_fit.DensityFit, *, max_z: int, min_z: float,
                                    composition: np.ndarray | None = None,
                                    site_z_sigma: float | None = None,
                                    lattice: np.ndarray | None = None, symprec: float = 0.0,
                                    min_distance: float = 0.5, boundary: float = 0.5,
                                    max_atoms: int = MAX_ATOMS) -> Reconstruction:
  """A repeat cube's crystal from its density alone (`density_fit`): the lattice from the
  density's translations (else the `lattice` given: a lattice head's, rows oriented as in the
  cube), the sites and their Z by least squares; sites with Z < `min_z` are
  noise. The species are the rounded Z (in [1, max_z]), or with a predicted `composition`
  (fractions per Z) `species_from_composition` (with `site_z_sigma`); with it, sites beyond the
  `atom_count` the density and the composition agree on are dropped, weakest first (on the first
  1,024 perov_5 validation cubes of the `cpu` model: lattice and positions right for 79.4% instead
  of 71.6%; docs/evaluation.md, "Atom count from the composition"). With `symprec` > 0 the crystal is
  symmetrised (`symmetry.symmetrize`) before its images are placed. `cube_atoms` holds the
  crystal's atoms inside the cube (those within `boundary` Å of a face marked `on_boundary`).
  A density (or composition) with NaN or infinite values, a lattice of the density with a
  vector shorter than 1 Å (no crystal's) and a cell of more than `max_atoms` sites give no
  crystal."""
  none = density_fit.images_in_cube(np.zeros(0, np.int32), np.zeros((0, 3)), np.eye(3), fit.box)
  unreadable = (_non_finite("density", fit.density, none)
                or _non_finite("composition", composition, none))
  if unreadable is not None:
    return unreadable
  if not np.any(fit.density > 0.5 * fit.unit_peak):
    return _invalid(NO_ATOMS, "the density has no peak of an atom (Z >= 0.5)", none)
  basis = usable_lattice(density_fit.lattice_from_density(fit.density, fit.box), fit.box)
  if basis is None:
    basis = usable_lattice(lattice, fit.box)
  if basis is None:
    return _invalid(NO_LATTICE, "the density's translations do not span a 3-D lattice", none)
  z, site_frac, basis = density_fit.find_sites(fit, basis, min_z=min_z)
  if z.size == 0:
    return _invalid(NO_ATOMS, f"no site of the density has Z >= {min_z}", none)
  if z.size > max_atoms:
    return _invalid(TOO_MANY_ATOMS, f"{z.size} sites in the cell (more than {max_atoms})", none)
  count = None if composition is None else atom_count(z, composition)
  if count is not None and z.size > count:
    z, site_frac = density_fit.keep_strongest(fit, basis, site_frac, count)
  species = (np.clip(np.rint(z), 1, max_z).astype(np.int32) if composition is None
             else species_from_composition(z, composition, site_z_sigma))
  basis, site_frac = symmetry.symmetrize(basis, species, site_frac, symprec)
  result = structure_from_sites(basis, species, site_frac, min_distance, max_atoms)
  atoms = density_fit.images_in_cube(species, site_frac, basis, fit.box, boundary)
  return dataclasses.replace(result, cube_atoms=atoms)


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
