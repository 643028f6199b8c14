"""A repeat cube's crystal read off its density alone, by least squares.

A repeat density is M(x) = Σ_s Z_s Σ_n g(x − r_s − n·B): every site s of the cell, with every
periodic image n·B (B: lattice rows) whose Gaussian g reaches the cube. Three steps recover B,
the sites r_s and their atomic numbers Z_s from a decoded M̂, with no segmentation:

* `lattice_from_density`: a lattice vector t leaves the density unchanged, M(x + t) = M(x), so
  t is a minimum of the normalised squared difference D(t) between the cube and its translate
  over their overlap (computed for every voxel shift at once with FFTs) and refined between voxels
  by a quadratic fit. Pseudo-translations (e.g. a perovskite's body centre, which swaps two
  cations) are minima too but far shallower, so only minima within a factor of the deepest count.
  The basis is the shortest, then the next shortest independent, then the shortest non-coplanar
  accepted vector: in 3-D these successive minima are a basis of the lattice.
* `find_sites`: the cube folded into the cell (every voxel averaged with its periodic copies)
  peaks at the heavier sites; a light atom between two heavy ones (the O between perovskite
  cations) is a saddle, not a peak, of M, but is a peak of the residual once the heavy sites are
  fitted. So sites are added from the peaks of the folded residual, refitted (`fit_sites`) and
  pruned while the weakest has Z < `min_z`, until no residual peak is left.
* `fit_sites`: Z is linear given the geometry; Gauss-Newton refines the positions (and the lattice)
  jointly with it: a lattice off by 0.01 Å moves an atom 0.03 Å three periods away, enough to
  change a fitted Z by one.

A unit-cell cube holds one cell and no periodic images: `atoms_from_density` reads its atoms by
the same least squares without a lattice (the lattice head gives the cell).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import ndimage

from crystal_vae import segmentation
from crystal_vae.segmentation import Atoms

# Lattice vectors: translations whose difference D is at most this factor of the deepest one
# (plus a floor for exactly periodic grids) and below an absolute ceiling.
_DEPTH_FACTOR = 2.5
_DEPTH_FLOOR = 5e-4
_MAX_DIFFERENCE = 0.03
# A translation is considered only if the cube and its translate overlap by this fraction.
_MIN_OVERLAP = 0.1
# The folded cell is binned at about this spacing (Å) and smoothed over ~0.7 bin.
_BIN_SIZE = 0.25
_SMOOTHING_BINS = 0.7
# Folded (residual) peaks below this Z's isolated peak height are not tried as sites: a light
# site next to heavy ones shows only a fraction of its peak until they are fitted.
_MIN_PEAK_Z = 0.5
_NEIGHBOURS = [offset for offset in itertools.product((-1, 0, 1), repeat=3) if any(offset)]


@dataclasses.dataclass(frozen=True)
class DensityFit:
  """A density grid (G, G, G) over a cube of side `box` (Å) made of Gaussians of width `sigma`;
  images up to `cutoff` (Å) outside the cube still reach it."""

  density: np.ndarray
  box: float
  sigma: float
  cutoff: float

  @property
  def axis(self) -> np.ndarray:
    """Voxel-centre coordinates along one axis."""
    grid = self.density.shape[0]
    return (np.arange(grid) + 0.5) * (self.box / grid)

  @property
  def unit_peak(self) -> float:
    """Peak height of an isolated Z = 1 atom."""
    return 1.0 / (self.sigma ** 3 * (2 * np.pi) ** 1.5)


def translation_difference(density: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """D(t) = Σ (M(x) − M(x + t))² / Σ (M(x)² + M(x + t)²) over the overlap of the cube and its
  translate, and the overlap's voxel count, for every voxel shift t (index t mod 2G); in float64,
  where the squares of a decoded float32 density's large values do not overflow."""
  density = np.asarray(density, np.float64)
  shape = (2 * density.shape[0],) * 3
  spectrum = lambda values: np.fft.rfftn(values, s=shape, axes=(0, 1, 2))
  correlate = lambda a, b: np.fft.irfftn(np.conj(a) * b, s=shape, axes=(0, 1, 2))
  values, squares, ones = (spectrum(density), spectrum(density ** 2),
                           spectrum(np.ones_like(density)))
  cross = correlate(values, values)
  energy = correlate(squares, ones) + correlate(ones, squares)
  overlap = np.rint(correlate(ones, ones))
  return (energy - 2 * cross) / np.maximum(energy, 1e-12), overlap


def _quadratic_minimum(block: np.ndarray) -> tuple[np.ndarray, float]:
  """Sub-voxel offset (in [-1, 1]³) and value of the minimum of a quadratic fitted to a 3×3×3
  block; the centre voxel's when the fit has no minimum there."""
  x, y, z = np.array(list(itertools.product((-1, 0, 1), repeat=3)), np.float64).T
  terms = np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], axis=1)
  c = np.linalg.lstsq(terms, block.reshape(-1), rcond=None)[0]
  hessian = np.array([[2 * c[4], c[7], c[8]], [c[7], 2 * c[5], c[9]], [c[8], c[9], 2 * c[6]]])
  centre = (np.zeros(3), float(block[1, 1, 1]))
  if np.any(np.linalg.eigvalsh(hessian) <= 0):
    return centre
  offset = -np.linalg.solve(hessian, c[1:4])
  if np.any(np.abs(offset) > 1):
    return centre
  return offset, float(min(block[1, 1, 1], max(0.0, c[0] + 0.5 * c[1:4] @ offset)))


def lattice_vectors(density: np.ndarray, box: float) -> np.ndarray:
  """Translations (Å, shortest first) that leave the density unchanged (see module doc)."""
  grid = density.shape[0]
  difference, overlap = translation_difference(density)
  reach = (2 * grid) // 3
  shifts = np.arange(-reach, reach + 1)
  window = np.ix_(*[shifts % (2 * grid)] * 3)
  difference = np.where(overlap[window] >= _MIN_OVERLAP * grid ** 3, difference[window], np.inf)
  minimum = np.isfinite(difference)
  for offset in _NEIGHBOURS:
    minimum &= difference <= np.roll(difference, offset, axis=(0, 1, 2))
  for axis in range(3):  # A minimum on the window's edge may continue outside it.
    edges = [slice(None)] * 3
    edges[axis] = [0, -1]
    minimum[tuple(edges)] = False
  minimum[reach, reach, reach] = False
  vectors, depths = [], []
  for index in np.argwhere(minimum):
    block = difference[tuple(slice(i - 1, i + 2) for i in index)]
    offset, depth = (_quadratic_minimum(block) if np.all(np.isfinite(block))
                     else (np.zeros(3), float(difference[tuple(index)])))
    vectors.append((index - reach + offset) * (box / grid))
    depths.append(depth)
  if not vectors:
    return np.zeros((0, 3))
  vectors, depths = np.array(vectors), np.array(depths)
  accepted = depths <= min(_MAX_DIFFERENCE, _DEPTH_FACTOR * depths.min() + _DEPTH_FLOOR)
  vectors = vectors[accepted]
  return vectors[np.argsort(np.linalg.norm(vectors, axis=1))]


def lattice_from_density(density: np.ndarray, box: float) -> np.ndarray | None:
  """A right-handed basis (rows, Å) of the density's lattice, or None if its translations
  span fewer than three dimensions."""
  basis = []
  for vector in lattice_vectors(density, box):
    lengths = np.prod(np.linalg.norm(basis, axis=1)) * np.linalg.norm(vector) if basis else 1.0
    if len(basis) == 1 and np.linalg.norm(np.cross(basis[0], vector)) < 0.3 * lengths:
      continue  # (anti)parallel to the first
    if len(basis) == 2 and abs(np.linalg.det(np.array(basis + [vector]))) < 0.2 * lengths:
      continue  # (nearly) in the plane of the first two
    basis.append(vector)
    if len(basis) == 3:
      basis = np.array(basis)
      return basis if np.linalg.det(basis) > 0 else basis * np.array([[1.0], [1.0], [-1.0]])
  return None


def fold(values: np.ndarray, basis: np.ndarray, box: float) -> np.ndarray:
  """The grid's values averaged over periodic copies, on a grid of fractional cell coordinates
  (bin centres at (i + 0.5) / bins), smoothed periodically so that no bin is empty."""
  grid = values.shape[0]
  axis = (np.arange(grid) + 0.5) * (box / grid)
  points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
  frac = np.mod(points @ np.linalg.inv(basis), 1.0)
  bins = np.maximum(4, np.ceil(np.linalg.norm(basis, axis=1) / _BIN_SIZE).astype(int))
  flat = np.ravel_multi_index(np.minimum((frac * bins).astype(int), bins - 1).T, bins)
  sums = np.bincount(flat, values.reshape(-1), bins.prod()).reshape(bins)
  counts = np.bincount(flat, None, bins.prod()).reshape(bins)
  kernel = 1.0
  for axis_index, n in enumerate(bins):
    distance = np.minimum(np.arange(n), n - np.arange(n))
    factor = np.fft.fft(np.exp(-0.5 * (distance / _SMOOTHING_BINS) ** 2))
    kernel = kernel * np.expand_dims(factor, [a for a in range(3) if a != axis_index])
  smooth = lambda grid_values: np.real(np.fft.ifftn(np.fft.fftn(grid_values) * kernel))
  return smooth(sums) / np.maximum(smooth(counts), 1e-6)


def _periodic_peaks(cell: np.ndarray, threshold: float) -> np.ndarray:
  """Fractional positions of the folded cell's periodic local maxima above `threshold`,
  highest first, refined between bins by a quadratic fit."""
  peak = cell > threshold
  for offset in _NEIGHBOURS:
    peak &= cell > np.roll(cell, offset, axis=(0, 1, 2))
  indices = np.argwhere(peak)
  indices = indices[np.argsort(-cell[peak])]
  shape = np.array(cell.shape)
  refined = []
  for index in indices:
    block = cell[np.ix_(*[np.arange(i - 1, i + 2) % n for i, n in zip(index, shape)])]
    refined.append(index + 0.5 + _quadratic_minimum(-block)[0])
  return np.array(refined).reshape(-1, 3) / shape


def _periodic_distances(frac_a: np.ndarray, frac_b: np.ndarray, basis: np.ndarray) -> np.ndarray:
  delta = frac_a[:, None, :] - frac_b[None, :, :]
  return np.linalg.norm((delta - np.round(delta)) @ basis, axis=-1)


def _rows_times(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
  """(r, i, m) x (q, m) -> (r, i, q), summed over m, as one BLAS matrix product."""
  return (rows.reshape(-1, rows.shape[-1]) @ columns.T).reshape(*rows.shape[:2], -1)


def _least_squares(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
  """argmin_x |matrix x - target|² through the (small) normal equations."""
  return _solve_normal(matrix.T @ matrix, matrix.T @ target)


def _solve_normal(gram: np.ndarray, projection: np.ndarray) -> np.ndarray:
  """x with gram x = projection (least squares where gram is singular)."""
  return np.linalg.lstsq(gram, projection, rcond=None)[0]


def site_images(fit: DensityFit, positions: np.ndarray, lattice: np.ndarray,
                gradients: bool = False):
  """Per site (cartesian `positions`), Σ_n g(x − r − n·B) over the voxels (V, sites); with
  `gradients` also its derivatives by the position (V, sites, 3) and the lattice
  (V, sites, 3, 3), per unit Z.

  g(x − p) = gx gy gz is separable, so a sum over images is one matrix product of the x
  factors with the outer products of the y and z factors; d/dp_d replaces factor d by
  g_d (x_d − p_d) / σ², and p = r + n·B gives dp_d/dB_id = n_i.
  """
  axis, sigma = fit.axis, fit.sigma
  scale = fit.unit_peak ** (1 / 3)
  corners = np.array(list(itertools.product((-fit.cutoff, fit.box + fit.cutoff), repeat=3)))
  inverse = np.linalg.inv(lattice)
  value, d_position, d_lattice = [], [], []
  for position in positions:
    span = (corners - position) @ inverse
    low, high = np.floor(span.min(axis=0)), np.ceil(span.max(axis=0))
    shifts = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(low, high)],
                                  indexing="ij"), axis=-1).reshape(-1, 3)
    places = position + shifts @ lattice
    near = np.all((places > -fit.cutoff) & (places < fit.box + fit.cutoff), axis=1)
    places, shifts = places[near], shifts[near]
    delta = [axis[:, None] - places[None, :, d] for d in range(3)]
    factor = [np.exp(-dd ** 2 / (2 * sigma ** 2)) * scale for dd in delta]
    yz = (factor[1][:, None, :] * factor[2][None, :, :]).reshape(-1, len(places))
    if not gradients:
      value.append((factor[0] @ yz.T).reshape(-1))
      continue
    derivative = [f * dd / sigma ** 2 for f, dd in zip(factor, delta)]
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
  value = np.stack(value, axis=1).reshape(-1, len(positions))
  if not gradients:
    return value
  return value, np.stack(d_position, axis=1), np.stack(d_lattice, axis=1)


def fit_sites(fit: DensityFit, basis: np.ndarray, site_frac: np.ndarray, *,
              iterations: int = 3, refine_lattice: bool = True, max_step: float = 0.15
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Atomic numbers (unrounded), fractional positions and lattice of the sites, fitted to the
  density: Z by linear least squares, then `iterations` Gauss-Newton steps on Z, positions and
  (with `refine_lattice`) the lattice, each step shortened so that no site or lattice vector
  moves more than `max_step` Å (a trust region: a site started far from its atom, or a spurious
  one, must not throw the others off)."""
  density = np.asarray(fit.density, np.float64).reshape(-1)
  lattice = np.asarray(basis, np.float64)
  positions = np.asarray(site_frac, np.float64) @ lattice
  count = positions.shape[0]
  z = _least_squares(site_images(fit, positions, lattice), density)
  for _ in range(iterations):
    value, d_position, d_lattice = site_images(fit, positions, lattice, True)
    columns = [value, (d_position * z[None, :, None]).reshape(density.size, -1)]
    if refine_lattice:
      columns.append(np.einsum("vsij,s->vij", d_lattice, z).reshape(density.size, 9))
    step = _least_squares(np.concatenate(columns, axis=1), density - value @ z)
    moves = step[count:].reshape(-1, 3)
    longest = np.linalg.norm(moves, axis=1).max()
    if not np.isfinite(longest):
      break
    step *= min(1.0, max_step / max(longest, 1e-12))
    z = z + step[:count]
    positions = positions + step[count:4 * count].reshape(-1, 3)
    if refine_lattice:
      lattice = lattice + step[4 * count:].reshape(3, 3)
  z = _least_squares(site_images(fit, positions, lattice), density)
  return z, np.mod(positions @ np.linalg.inv(lattice), 1.0), lattice


def _prune(fit: DensityFit, basis: np.ndarray, site_frac: np.ndarray, min_z: float,
           max_sites: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Drops the weakest site and refits Z (linear) while some site has Z < min_z or more than
  `max_sites` are left. The normal equations of the kept sites are a submatrix of all sites':
  formed once."""
  density = np.asarray(fit.density, np.float64).reshape(-1)
  values = site_images(fit, site_frac @ basis, basis)
  gram, projection = values.T @ values, values.T @ density
  kept = np.arange(len(site_frac))
  limit = len(site_frac) if max_sites is None else max_sites
  while True:
    z = _solve_normal(gram[np.ix_(kept, kept)], projection[kept])
    if z.size == 0 or (z.min() >= min_z and z.size <= limit):
      return z, site_frac[kept]
    kept = np.delete(kept, int(np.argmin(z)))


def keep_strongest(fit: DensityFit, basis: np.ndarray, site_frac: np.ndarray, count: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Z (refitted, linear) and fractional positions of the `count` sites left after dropping the
  weakest one at a time. The positions stay those fitted with every site in: refitted without
  them, the sites would move to cover the dropped ones' density."""
  return _prune(fit, basis, site_frac, -np.inf, max_sites=count)


def add_sites(fit: DensityFit, basis: np.ndarray, site_frac: np.ndarray, count: int, *,
              min_z: float, min_separation: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Z, fractional positions and lattice of the given sites and up to `count` more: the highest
  peaks of the folded residual (of any height) at least `min_separation` Å from every site, all
  refitted (`fit_sites`); an added site fitted at Z < `min_z` is dropped again. For atoms known
  to be there (`species_choice.light_atoms_missing`) but too faint to pass `find_sites`' bar."""
  density = np.asarray(fit.density, np.float64)
  values = site_images(fit, site_frac @ basis, basis)
  residual = density - (values @ _least_squares(values, density.reshape(-1))).reshape(density.shape)
  sites = np.asarray(site_frac, np.float64)
  found = len(sites)
  for peak in _periodic_peaks(fold(residual, basis, fit.box), -np.inf):
    if len(sites) >= found + count:
      break
    if len(sites) == 0 or _periodic_distances(peak[None], sites, basis).min() >= min_separation:
      sites = np.vstack([sites, peak])
  z, fitted, refined = fit_sites(fit, basis, sites, iterations=3)
  keep = (np.arange(len(z)) < found) | (z >= min_z)
  if keep.all():
    return z, fitted, refined
  return fit_sites(fit, refined, fitted[keep], iterations=3)


def find_sites(fit: DensityFit, basis: np.ndarray, *, min_z: float, min_separation: float = 1.0,
               rounds: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The cell's sites (see module doc): unrounded Z, fractional positions and the refined
  lattice. A site needs a folded (residual) peak at least as high as an isolated atom's of
  Z = 0.5, a fitted Z >= `min_z` and `min_separation` Å from the other sites."""
  threshold = _MIN_PEAK_Z * fit.unit_peak
  density = np.asarray(fit.density, np.float64)
  sites = np.zeros((0, 3))

  def add_peaks(values: np.ndarray) -> int:
    nonlocal sites
    added = 0
    for peak in _periodic_peaks(fold(values, basis, fit.box), threshold):
      if len(sites) == 0 or _periodic_distances(peak[None], sites, basis).min() >= min_separation:
        sites = np.vstack([sites, peak])
        added += 1
    return added

  add_peaks(density)
  for _ in range(rounds):
    if len(sites) == 0:
      break
    _, sites, _ = fit_sites(fit, basis, sites, iterations=2, refine_lattice=False)
    # Half the bar while sites are missing: a light site's Z is low until its neighbours are in.
    z, sites = _prune(fit, basis, sites, 0.5 * min_z)
    if len(sites) == 0:
      break
    residual = density - (site_images(fit, sites @ basis, basis) @ z).reshape(density.shape)
    if not add_peaks(residual):
      break
  if len(sites) == 0:
    return np.zeros(0), sites, basis
  _, sites = _prune(fit, basis, sites, min_z)
  if len(sites) == 0:
    return np.zeros(0), sites, basis
  z, sites, basis = fit_sites(fit, basis, sites, iterations=3)
  keep = z >= min_z
  return z[keep], sites[keep], basis


def images_in_cube(species: np.ndarray, site_frac: np.ndarray, basis: np.ndarray, box: float,
                   boundary: float = 0.5) -> Atoms:
  """Every periodic image of the sites whose centre lies in the cube [0, box]³; those within
  `boundary` Å of a face are `on_boundary`. `voxels` is 0: these atoms are not segmented."""
  if len(species) == 0:
    return Atoms(np.zeros(0, np.int32), np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0, bool))
  corners = np.array(list(itertools.product((0.0, box), repeat=3)))
  span = corners @ np.linalg.inv(basis)
  ranges = [np.arange(np.floor(low) - 1, np.ceil(high) + 1)
            for low, high in zip(span.min(axis=0), span.max(axis=0))]
  shifts = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
  positions = ((site_frac[:, None, :] + shifts[None]) @ basis).reshape(-1, 3)
  labels = np.repeat(np.asarray(species, np.int32), shifts.shape[0])
  inside = np.all((positions >= 0) & (positions <= box), axis=1)
  positions, labels = positions[inside], labels[inside]
  near_face = np.any((positions < boundary) | (positions > box - boundary), axis=1)
  return Atoms(labels, positions, np.zeros(len(labels), np.int64), near_face)


# Gauss-Newton moves an atom by at most this (Å) per iteration: far from the optimum (a light atom
# started at the residual's peak voxel, beside heavy neighbours) a full step overshoots.
_MAX_STEP = 0.2
# atoms_from_density: two atoms fitted closer than this fraction of `min_separation` share one
# atom's density (e.g. each half of it, on either side) and are merged.
_MERGE = 0.7


def _gaussians(axis: np.ndarray, positions: np.ndarray, sigma: float):
  """Each atom's normalised Gaussian g(x − r) at the voxel centres (G³, n), built from one factor
  per axis (g is separable), with the per-axis offsets and factors for the position derivatives."""
  delta = [axis[:, None] - positions[None, :, d] for d in range(3)]
  factor = [np.exp(-dd ** 2 / (2 * sigma ** 2)) for dd in delta]
  norm = 1.0 / (sigma ** 3 * (2 * np.pi) ** 1.5)
  gauss = np.einsum("im,jm,km->ijkm", *factor).reshape(-1, positions.shape[0]) * norm
  return gauss, delta, factor, norm


def _fit_gaussians(positions: np.ndarray, target: np.ndarray, axis: np.ndarray, sigma: float,
                   iterations: int, max_move: float) -> tuple[np.ndarray, np.ndarray]:
  """Least squares of M(x) = Σ_m Z_m g(x − r_m) on the voxels: Z is linear given the positions;
  Gauss-Newton refines positions and Z jointly. An atom that moves by more than `max_move` Å
  keeps its starting position (the fit is not trusted there). Returns (positions, real Z)."""
  start = positions.copy()
  gauss, *_ = _gaussians(axis, positions, sigma)
  z = _least_squares(gauss, target)
  for _ in range(iterations):
    gauss, delta, factor, norm = _gaussians(axis, positions, sigma)
    columns = [gauss]
    for d in range(3):
      # d/dr_d of Z g(x - r) = Z g (x_d - r_d) / sigma^2.
      scaled = [f * (delta[d] / sigma ** 2 if e == d else 1.0) for e, f in enumerate(factor)]
      columns.append(np.einsum("im,jm,km->ijkm", *scaled).reshape(-1, len(z)) * norm * z)
    step = _least_squares(np.concatenate(columns, axis=1), target - gauss @ z)
    z = z + step[:len(z)]
    move = step[len(z):].reshape(3, len(z)).T
    length = np.linalg.norm(move, axis=1, keepdims=True)
    positions = positions + move * np.minimum(1.0, _MAX_STEP / np.maximum(length, 1e-12))
  moved = np.linalg.norm(positions - start, axis=1) > max_move
  positions[moved] = start[moved]
  gauss, *_ = _gaussians(axis, positions, sigma)
  return positions, _least_squares(gauss, target)


def _closest_pair(positions: np.ndarray) -> tuple[int, int, float]:
  """The two closest positions (indices) and their distance; inf for fewer than two."""
  if len(positions) < 2:
    return 0, 0, np.inf
  distance = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
  distance[np.diag_indices(len(positions))] = np.inf
  first, second = np.unravel_index(np.argmin(distance), distance.shape)
  return int(first), int(second), float(distance[first, second])


def atoms_from_density(density: np.ndarray, box: float, sigma: float, max_z: int, *,
                       min_z: float = 2.0, min_separation: float = 1.8, max_rounds: int = 10,
                       iterations: int = 4, max_atoms: int = segmentation.MAX_ATOMS) -> Atoms:
  """The atoms of a unit-cell cube read off its (decoded) density alone, by least squares.

  The density of atoms at r_m with atomic numbers Z_m is M(x) = Σ_m Z_m g(x − r_m), g the
  normalised Gaussian of width `sigma`. Atoms are added at the local maxima of the residual M −
  Σ Z g worth at least half of `min_z` (at least `min_separation` Å from every atom, highest
  first), then all are refitted jointly (`_fit_gaussians`); two atoms the fit brings closer than
  0.7 `min_separation` are merged and those with Z < `min_z` dropped, each time refitting;
  until no residual peak is left, or a round ends with no more atoms than it began with (its new
  atoms merged or dropped again: the next round would repeat it; on a poorly decoded Materials
  Project cell such cycles ran to the 10th round, a minute per cube). A light atom between heavy
  ones (a perovskite's O, 2 Å from two cations: a saddle of M) is a peak of the residual once
  the heavy ones are fitted. Least squares go through the normal equations. Z is finally rounded
  to the nearest integer in [1, max_z]. A density with a NaN or infinite voxel gives no atoms
  (reason `NON_FINITE`), nor does one that would need more than `max_atoms` (`TOO_MANY_ATOMS`:
  noise, whose fits would take minutes).
  """
  density = np.asarray(density, np.float64)
  detail = segmentation.non_finite_detail(density)
  if detail is not None:
    return segmentation.no_atoms(segmentation.NON_FINITE, detail)
  grid = density.shape[0]
  axis = (np.arange(grid) + 0.5) * (box / grid)
  target = density.reshape(-1)
  unit_peak = 1.0 / (sigma ** 3 * (2 * np.pi) ** 1.5)
  points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
  positions, z = np.zeros((0, 3)), np.zeros(0)
  for _ in range(max_rounds):
    residual = target - (_gaussians(axis, positions, sigma)[0] @ z if len(z) else 0.0)
    cube = residual.reshape(density.shape)
    peak = ((cube == ndimage.maximum_filter(cube, size=3, mode="nearest"))
            & (cube > 0.5 * min_z * unit_peak))
    added = []
    for index in np.flatnonzero(peak.reshape(-1))[np.argsort(-residual[peak.reshape(-1)])]:
      point = points[index]
      if all(np.linalg.norm(point - other) >= min_separation
             for other in [*positions, *added]):
        added.append(point)
        if len(positions) + len(added) > max_atoms:
          return segmentation.no_atoms(
              segmentation.TOO_MANY_ATOMS, f"more than {max_atoms} atoms (peaks of Z >="
              f" {0.5 * min_z:g} at least {min_separation} Å apart) in the density")
    if not added:
      break
    before = len(positions)
    positions = np.concatenate([positions, np.array(added)])
    positions, z = _fit_gaussians(positions, target, axis, sigma, iterations, min_separation / 2)
    while len(z) and (z.min() < min_z or _closest_pair(positions)[2] < _MERGE * min_separation):
      first, second, distance = _closest_pair(positions)
      if distance < _MERGE * min_separation:  # two atoms fitted to one: merge them
        weights = np.maximum(z[[first, second]], 1e-6)
        positions[first] = weights @ positions[[first, second]] / weights.sum()
        positions = np.delete(positions, second, axis=0)
      else:
        positions = positions[z >= min_z]
      if not len(positions):  # every atom too light (noise): the next round would be this one
        return Atoms(np.zeros(0, np.int32), positions, np.zeros(0, np.int64),
                     np.zeros(0, bool))
      positions, z = _fit_gaussians(positions, target, axis, sigma, iterations, min_separation / 2)
    if len(positions) <= before:  # the round's new atoms were merged or dropped again: a cycle
      break
  species = np.clip(np.rint(z), 1, max_z).astype(np.int32)
  voxel = np.floor(positions / (box / grid)).astype(np.int64)
  on_boundary = np.any((voxel <= 0) | (voxel >= grid - 1), axis=1)
  return Atoms(species=species, positions=positions, voxels=np.zeros(len(z), np.int64),
               on_boundary=on_boundary)
