"""Decoded atoms -> crystals (pymatgen `Structure`), for both voxel representations.

This module ties the steps together; the lattice is found in `lattice_recovery`, the sites'
elements chosen in `species_choice`, and the crystals written out by `writing`.

* "repeat": the lattice is read off the periodicity of the decoded atoms
  (`lattice_recovery.repeat_lattice`); its right-handed Niggli-reduced form is placed in
  pymatgen's standard orientation (`Lattice.from_parameters`). All atoms are then folded into the
  cell and the periodic copies of each site are merged (species: vote over the copies; position:
  mean of the copies relative to a representative, across the cell wrap). Atoms touching a cube
  face are cut by it and get a small weight. A site seen in fewer than `min_site_support` of the
  places inside the cube where the lattice says it should appear is noise and is dropped.
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

import dataclasses

import numpy as np
from pymatgen.core import Lattice, Structure
from scipy import spatial
from scipy.cluster import hierarchy

from crystal_vae import density_fit
from crystal_vae import lattice_recovery
from crystal_vae import segmentation
from crystal_vae import species_choice
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
  sites. With a predicted `composition` (fractions per Z) the species are
  `species_choice.species_from_composition` of the segmented ones (with `site_z_sigma`). With
  `symprec` > 0 the cell is symmetrised (`symmetry.symmetrize`) and each decoded atom moves with
  its site.

  `fitted_z`: the atoms' species are Z fitted to the density (`density_fit.atoms_from_density`).
  An atom on a face of the cell (frac 0 or 1: perov_5's corner and face sites) is decoded as a
  share of it at each of the two faces; so copies closer than `FITTED_MERGE_TOLERANCE` (periodic)
  are one atom, its Z the sum of theirs and its position their Z-weighted mean. With a
  `composition` too, sites beyond the `species_choice.atom_count` the sites' Z and the composition
  agree on are dropped, lightest first, with their decoded atoms.
  """
  unreadable = _unreadable_atoms(atoms, max_atoms) or _non_finite("composition", composition)
  if unreadable is not None:
    return unreadable
  lattice = np.asarray(lattice, np.float64)
  problem = lattice_recovery.cell_problem(lattice, box, min_volume)
  if problem is not None:
    return _invalid(INVALID_LATTICE, problem)
  if np.linalg.det(lattice) < 0:  # Left-handed: -lattice spans the same points, right-handed.
    lattice = -lattice
  cartesian = atoms.positions - box / 2 + 0.5 * lattice.sum(axis=0)
  frac = np.mod(cartesian @ np.linalg.inv(lattice), 1.0)
  if fitted_z:
    weights = atoms.species.astype(np.float64)
    _, site_frac, cluster = _merge_sites(lattice, frac, atoms.species, weights,
                                         FITTED_MERGE_TOLERANCE)
    site_z = np.bincount(cluster, weights=weights)
    count = None if composition is None else species_choice.atom_count(site_z, composition)
    if count is not None and len(site_z) > count:  # the lightest sites beyond it are spurious
      kept = np.sort(np.argsort(-site_z, kind="stable")[:count])
      renumber = np.full(len(site_z), -1)
      renumber[kept] = np.arange(count)
      member = np.isin(cluster, kept)
      atoms, cartesian = atoms.subset(member), cartesian[member]
      cluster, site_z, site_frac = renumber[cluster[member]], site_z[kept], site_frac[kept]
    species = site_z.round().astype(np.int32)
  else:
    species, site_frac, cluster = _merge_sites(lattice, frac, atoms.species,
                                               np.ones(len(atoms)), 0.3)
  if composition is not None:
    species = species_choice.species_from_composition(species, composition, site_z_sigma)
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
  interior = ~atoms.on_boundary
  basis, why = lattice_recovery.repeat_lattice(
      atoms.positions[interior], atoms.species[interior], box, density=density, lattice=lattice,
      lattice_snap=lattice_snap, volume_tolerance=volume_tolerance, tolerance=tolerance,
      margin=margin, min_checks=min_checks, min_fraction=min_fraction,
      veto_fraction=veto_fraction, num_references=num_references)
  if basis is None:
    return _invalid(NO_LATTICE, why)
  frac = atoms.positions @ np.linalg.inv(basis)
  weights = np.where(atoms.on_boundary, _BOUNDARY_WEIGHT, 1.0)
  site_species, site_frac, cluster = _merge_sites(basis, np.mod(frac, 1.0), atoms.species,
                                                  weights, merge_tolerance)
  # Support: copies found inside the checked region / places there where the lattice puts the site.
  checked = lattice_recovery.inside_cube(atoms.positions, box, margin) & interior
  found = np.bincount(cluster[checked], minlength=site_species.shape[0])
  span = np.ceil(box * np.abs(np.linalg.inv(basis)).sum(axis=0)).astype(int) + 1
  shifts = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in span], indexing="ij"),
                    axis=-1).reshape(-1, 3)
  places = (site_frac[:, None, :] + shifts[None]) @ basis
  expected = lattice_recovery.inside_cube(places, box, margin).sum(axis=1)
  keep = (expected == 0) | (found >= min_site_support * expected)
  if not keep.any():
    return _invalid(NO_ATOMS, "no site is supported by its periodic copies")
  site_species = site_species[keep]
  basis, site_frac = symmetry.symmetrize(basis, site_species, site_frac[keep], symprec)
  return structure_from_sites(basis, site_species, site_frac, min_distance, max_atoms)


def reconstruct_repeat_from_density(fit: density_fit.DensityFit, *, max_z: int, min_z: float,
                                    composition: np.ndarray | None = None,
                                    site_z_sigma: float | None = None,
                                    lattice: np.ndarray | None = None, symprec: float = 0.0,
                                    min_distance: float = 0.5, boundary: float = 0.5,
                                    max_atoms: int = MAX_ATOMS) -> Reconstruction:
  """A repeat cube's crystal from its density alone (`density_fit`): the lattice from the
  density's translations (else the `lattice` given: a lattice head's, rows oriented as in the
  cube), the sites and their Z by least squares; sites with Z < `min_z` are noise. The species are
  the rounded Z (in [1, max_z]), or with a predicted `composition` (fractions per Z)
  `species_choice.species_from_composition` (with `site_z_sigma`); with it, sites beyond the
  `species_choice.atom_count` the density and the composition agree on are dropped, weakest first
  (on the first 1,024 perov_5 validation cubes of the `cpu` model: lattice and positions right for
  79.4% instead of 71.6%; docs/evaluation.md, "Atom count from the composition"), and atoms
  lighter than `min_z` that the composition asks for (`species_choice.light_atoms_missing`) are
  added at the residual's highest peaks (`density_fit.add_sites`). With
  `symprec` > 0 the crystal is symmetrised (`symmetry.symmetrize`) before its images are placed.
  `cube_atoms` holds the crystal's atoms inside the cube (those within `boundary` Å of a face
  marked `on_boundary`). A density (or composition) with NaN or infinite values, a lattice of the
  density with a vector shorter than 1 Å (no crystal's) and a cell of more than `max_atoms` sites
  give no crystal."""
  none = density_fit.images_in_cube(np.zeros(0, np.int32), np.zeros((0, 3)), np.eye(3), fit.box)
  unreadable = (_non_finite("density", fit.density, none)
                or _non_finite("composition", composition, none))
  if unreadable is not None:
    return unreadable
  if not np.any(fit.density > 0.5 * fit.unit_peak):
    return _invalid(NO_ATOMS, "the density has no peak of an atom (Z >= 0.5)", none)
  basis = lattice_recovery.usable_lattice(
      density_fit.lattice_from_density(fit.density, fit.box), fit.box)
  if basis is None:
    basis = lattice_recovery.usable_lattice(lattice, fit.box)
  if basis is None:
    return _invalid(NO_LATTICE, "the density's translations do not span a 3-D lattice", none)
  z, site_frac, basis = density_fit.find_sites(fit, basis, min_z=min_z)
  if z.size == 0:
    return _invalid(NO_ATOMS, f"no site of the density has Z >= {min_z}", none)
  if z.size > max_atoms:
    return _invalid(TOO_MANY_ATOMS, f"{z.size} sites in the cell (more than {max_atoms})", none)
  count = None if composition is None else species_choice.atom_count(z, composition)
  if count is not None and z.size > count:
    z, site_frac = density_fit.keep_strongest(fit, basis, site_frac, count)
  missing = 0 if composition is None else species_choice.light_atoms_missing(z, composition, min_z)
  if missing:
    z, site_frac, basis = density_fit.add_sites(fit, basis, site_frac, missing, min_z=0.5 * min_z)
  species = (np.clip(np.rint(z), 1, max_z).astype(np.int32) if composition is None
             else species_choice.species_from_composition(z, composition, site_z_sigma))
  basis, site_frac = symmetry.symmetrize(basis, species, site_frac, symprec)
  result = structure_from_sites(basis, species, site_frac, min_distance, max_atoms)
  atoms = density_fit.images_in_cube(species, site_frac, basis, fit.box, boundary)
  return dataclasses.replace(result, cube_atoms=atoms)

