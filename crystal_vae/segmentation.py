"""Species grids -> atoms: connected components, majority species, centres of mass.

A species grid (the argmax of the segmentation logits, or a true grid from `voxelize`) marks the
voxels within `species_radius` of an atom with that atom's Z and every other voxel with 0. Atoms
are recovered per structure as follows.

1. Components: non-zero voxels are linked to their 6 face neighbours of the SAME species and the
   connected components of that graph are taken. Face (6-) connectivity keeps two neighbouring
   atoms apart for as long as possible: at the default 30^3 voxels in 10 Å, two same-species
   spheres of radius 0.5 Å stay separate down to ~1.33 Å apart, against ~1.58 Å with 26-
   connectivity (C-C bonds are 1.4-1.55 Å), while one atom's sphere (radius 1.5 voxels) is always
   a single face-connected blob. Linking only equal species splits touching atoms of different
   species (O-H, C-H) exactly where their voxels change species.
2. Noise: a component of fewer than `min_size` voxels is a fragment (a few argmax voxels of the
   wrong species inside an atom, or a sliver of an atom outside the cube). It is absorbed into
   the neighbouring component of at least `min_size` voxels that it shares the most faces with,
   or dropped when it touches none. The species of each resulting atom is the majority vote over
   its voxels, so absorbed wrong-species fragments do not change it.
3. Close atoms of one species (H2 0.74 Å, N2 and azides, peroxides, C2 dimers: closer than
   ~1.33 Å) form one component. The density cannot separate them (two Gaussians of width σ have
   one maximum until they are 2σ = 2 Å apart), but the component's shape can: one atom's voxels
   are a ball whose largest variance along any direction is r²/5 + voxel²/12 (0.059 Å² at the
   defaults; at most 0.074 Å² over sub-voxel placements), two balls 0.6 Å apart already give
   ≥ 0.11 Å². A component whose largest covariance eigenvalue exceeds 1.6 × r²/5 + voxel²/12 is
   split in two by 2-means started at its extreme voxels along the principal axis, and each part
   again until every part is round (chains of three, e.g. N3, split twice). Parts smaller than
   `min_size` are not split off, nor are blobs of more than five atoms' voxels (noise of a
   poorly decoded grid, not close atoms).
4. Position: the centre of mass of the atom's voxel centres (i + 0.5) * box / grid in Å, weighted
   by the decoded density where given (negative densities count as 0), else uniformly.

Everything runs over the whole batch at once (one sparse graph, `np.bincount` reductions).
Atoms touching a cube face (`on_boundary`) may be cut by the face, so their centres are biased
inwards; the repeat reconstruction uses them with a small weight only.

A cube whose density is not finite gives no atoms, and `density_fit.atoms_from_density` none past
`MAX_ATOMS`; such `Atoms` name the `reason` (`NON_FINITE`, `TOO_MANY_ATOMS`), which the
reconstruction reports instead of a crystal.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

# Why a decoded cube gives no atoms although it is not empty (`Atoms.reason`).
NON_FINITE = "non_finite"
TOO_MANY_ATOMS = "too_many_atoms"
# The most atoms read in one cube's cell: twice the 64 a dataset's cell holds by default
# (`crystals.CrystalLimits`), a unit cell's atoms on its faces being decoded on both. A decoded
# density of noise has hundreds of peaks (a constant one at 16³: 216, whose joint fit took 8 to
# 34 s on 2 busy cores).
MAX_ATOMS = 128


@dataclasses.dataclass(frozen=True)
class Atoms:
  """The atoms found in one cube: species (n,) int32, positions (n, 3) Å in cube coordinates,
  voxels (n,) voxel count of each atom, on_boundary (n,) whether it touches a cube face; where
  the cube gave none because it could not be read, the `reason` (`NON_FINITE`,
  `TOO_MANY_ATOMS`) and a `detail`."""

  species: np.ndarray
  positions: np.ndarray
  voxels: np.ndarray
  on_boundary: np.ndarray
  reason: str | None = None
  detail: str = ""

  def __len__(self) -> int:
    return int(self.species.shape[0])

  def subset(self, keep: np.ndarray) -> "Atoms":
    """The atoms where `keep` (n,) is true."""
    return dataclasses.replace(self, species=self.species[keep], positions=self.positions[keep],
                               voxels=self.voxels[keep], on_boundary=self.on_boundary[keep])


def no_atoms(reason: str, detail: str) -> Atoms:
  """The `Atoms` of a cube that could not be read, with the reason."""
  return Atoms(np.zeros(0, np.int32), np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0, bool),
               reason=reason, detail=detail)


def non_finite_detail(values: np.ndarray, name: str = "density") -> str | None:
  """How many of a decoded output's `values` are NaN or infinite, or None if none is."""
  bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
  if not bad:
    return None
  return f"{bad} of {np.size(values)} values of the decoded {name} are NaN or infinite"


def _face_pairs(shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
  """Flat indices (a, b) of face-neighbouring voxel pairs along each spatial axis of (B, G, G, G)."""
  index = np.arange(np.prod(shape)).reshape(shape)
  pairs = []
  for axis in (1, 2, 3):
    first = [slice(None)] * 4
    second = [slice(None)] * 4
    first[axis] = slice(None, -1)
    second[axis] = slice(1, None)
    pairs.append((index[tuple(first)].ravel(), index[tuple(second)].ravel()))
  return pairs


def _absorb_fragments(labels: np.ndarray, sizes: np.ndarray, edge_a: np.ndarray,
                      edge_b: np.ndarray, min_size: int) -> np.ndarray:
  """Maps each component to the component it ends up in (-1: dropped); edges join voxels of
  different components (indices into `labels`)."""
  target = np.arange(sizes.shape[0])
  small = sizes < min_size
  target[small] = -1
  if not small.any() or edge_a.size == 0:
    return target
  source = np.concatenate([labels[edge_a], labels[edge_b]])
  other = np.concatenate([labels[edge_b], labels[edge_a]])
  keep = small[source] & ~small[other]
  pair_keys, counts = np.unique(source[keep] * sizes.shape[0] + other[keep], return_counts=True)
  if pair_keys.size == 0:
    return target
  # Per fragment, the neighbour sharing the most faces (ties: the lower label).
  order = np.lexsort((-counts, pair_keys // sizes.shape[0]))
  fragments = pair_keys[order] // sizes.shape[0]
  first = np.ones(order.size, bool)
  first[1:] = fragments[1:] != fragments[:-1]
  target[fragments[first]] = pair_keys[order][first] % sizes.shape[0]
  return target


def _voxel_points(voxel: np.ndarray, shape: tuple[int, ...], voxel_size: float) -> np.ndarray:
  """Cube coordinates (Å) of flat voxel indices of a (B, G, G, G) grid (the structure ignored)."""
  _, i, j, k = np.unravel_index(voxel, shape)
  return (np.stack([i, j, k], axis=-1) + 0.5) * voxel_size


def _split_in_two(points: np.ndarray, iterations: int = 8) -> np.ndarray:
  """2-means labels (0/1) of points, started at the extremes of the principal axis."""
  centred = points - points.mean(axis=0)
  axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]
  projection = centred @ axis
  centres = points[[np.argmin(projection), np.argmax(projection)]]
  for _ in range(iterations):
    labels = np.argmin(np.linalg.norm(points[:, None] - centres[None], axis=-1), axis=1)
    if labels.min() == labels.max():
      break
    centres = np.stack([points[labels == part].mean(axis=0) for part in (0, 1)])
  return labels


def _round_parts(points: np.ndarray, threshold: float, min_size: int) -> list[np.ndarray]:
  """Index sets of `points` split until each part's largest variance is <= threshold."""
  indices = np.arange(len(points))
  if len(points) < 2 * min_size or np.linalg.eigvalsh(np.cov(points.T, bias=True))[-1] <= threshold:
    return [indices]
  labels = _split_in_two(points)
  if min(np.sum(labels == 0), np.sum(labels == 1)) < min_size:
    return [indices]
  return [indices[labels == part][sub] for part in (0, 1)
          for sub in _round_parts(points[labels == part], threshold, min_size)]


def _split_elongated(atom_of_node: np.ndarray, voxel: np.ndarray, shape: tuple[int, ...],
                     voxel_size: float, radius: float, min_size: int) -> np.ndarray:
  """`atom_of_node` with every atom whose voxels are not a ball split (module docstring, 3);
  new atoms take ids after the existing ones."""
  count = int(atom_of_node.max(initial=-1)) + 1
  if count == 0:  # nothing segmented
    return atom_of_node
  threshold = 1.6 * radius ** 2 / 5 + voxel_size ** 2 / 12
  points = _voxel_points(voxel, shape, voxel_size)
  size = np.bincount(atom_of_node, minlength=count)
  mean = np.stack([np.bincount(atom_of_node, points[:, d], count) for d in range(3)], -1)
  mean /= np.maximum(size, 1)[:, None]
  centred = points - mean[atom_of_node]
  covariance = np.stack([np.stack([np.bincount(atom_of_node, centred[:, a] * centred[:, b], count)
                                   for b in range(3)], -1) for a in range(3)], -2)
  covariance /= np.maximum(size, 1)[:, None, None]
  # Chains of up to ~5 atoms; a larger blob is not close atoms but a poorly decoded grid, kept
  # whole (splitting it would make hundreds of atoms out of noise).
  ball = 4 / 3 * np.pi * radius ** 3 / voxel_size ** 3
  elongated = np.flatnonzero((np.linalg.eigvalsh(covariance)[:, -1] > threshold)
                             & (size >= 2 * min_size) & (size <= 5 * ball))
  result = atom_of_node.copy()
  for atom in elongated:
    members = np.flatnonzero(atom_of_node == atom)
    for part in _round_parts(points[members], threshold, min_size)[1:]:
      result[members[part]] = count
      count += 1
  return result


def segment_batch(species: np.ndarray, box: float, *, density: np.ndarray | None = None,
                  min_size: int = 3, species_radius: float = 0.5) -> list[Atoms]:
  """Atoms of each species grid in a batch (B, G, G, G) (0 = empty); see the module docstring.

  Args:
    species: int (B, G, G, G) species grids.
    box: cube side in Å.
    density: optional (B, G, G, G) decoded density used as centre-of-mass weights.
    min_size: components with fewer voxels are absorbed into a touching atom or dropped.
    species_radius: the radius (Å) of one atom's voxels in the grid, for splitting close atoms.
  Returns:
    one `Atoms` per structure, atoms in the order of their first voxel (x-major scan); none,
    with the reason `NON_FINITE`, for a structure whose density has a NaN or infinite voxel.
  """
  species = np.asarray(species)
  if species.ndim != 4:
    raise ValueError(f"species must be (B, G, G, G), got shape {species.shape}")
  batch, grid = species.shape[0], species.shape[1]
  unreadable = {}
  if density is not None:
    for index, cube in enumerate(density):
      detail = non_finite_detail(cube)
      if detail is not None:
        unreadable[index] = no_atoms(NON_FINITE, detail)
    if unreadable:  # their voxels are left out (and with them their densities' weights)
      species = species.copy()
      species[list(unreadable)] = 0
  flat_species = species.reshape(-1)
  occupied = np.flatnonzero(flat_species)
  node_of = np.full(flat_species.shape[0], -1, dtype=np.int64)
  node_of[occupied] = np.arange(occupied.size)
  same_a, same_b, cross_a, cross_b = [], [], [], []
  for a, b in _face_pairs(species.shape):
    za, zb = flat_species[a], flat_species[b]
    both = (za != 0) & (zb != 0)
    same = both & (za == zb)
    cross = both & (za != zb)
    same_a.append(node_of[a[same]])
    same_b.append(node_of[b[same]])
    cross_a.append(node_of[a[cross]])
    cross_b.append(node_of[b[cross]])
  same_a, same_b = np.concatenate(same_a), np.concatenate(same_b)
  graph = sparse.coo_matrix((np.ones(same_a.size, np.int8), (same_a, same_b)),
                            shape=(occupied.size, occupied.size))
  _, labels = csgraph.connected_components(graph, directed=False)
  sizes = np.bincount(labels, minlength=labels.max(initial=-1) + 1)
  target = _absorb_fragments(labels, sizes, np.concatenate(cross_a), np.concatenate(cross_b),
                             min_size)
  atom_of_node = target[labels]
  keep = atom_of_node >= 0
  nodes = np.flatnonzero(keep)
  atom_of_node[nodes] = _split_elongated(atom_of_node[nodes], occupied[nodes], species.shape,
                                         box / grid, species_radius, min_size)
  # Renumber surviving atoms 0..n-1 in order of their first voxel (nodes are in flat order).
  atom_ids, first_node, atom_of_node = np.unique(atom_of_node[nodes], return_index=True,
                                                 return_inverse=True)
  rank = np.empty(atom_ids.size, np.int64)
  rank[np.argsort(first_node)] = np.arange(atom_ids.size)
  atom_of_node = rank[atom_of_node]
  num_atoms = atom_ids.size
  voxel = occupied[nodes]
  structure_of_voxel, i, j, k = np.unravel_index(voxel, species.shape)
  z_of_voxel = flat_species[voxel].astype(np.int64)

  # Majority species: count (atom, Z) pairs, keep each atom's most frequent Z (ties: larger Z).
  max_z = int(z_of_voxel.max(initial=0)) + 1
  pair_keys, counts = np.unique(atom_of_node * max_z + z_of_voxel, return_counts=True)
  order = np.lexsort((-(pair_keys % max_z), -counts, pair_keys // max_z))
  atoms_sorted = pair_keys[order] // max_z
  first = np.ones(order.size, bool)
  first[1:] = atoms_sorted[1:] != atoms_sorted[:-1]
  atom_species = (pair_keys[order][first] % max_z).astype(np.int32)

  if density is None:
    weights = np.ones(voxel.size)
  else:
    weights = np.maximum(np.asarray(density, np.float64).reshape(-1)[voxel], 0.0)
    # An atom whose voxels all have zero density falls back to uniform weights.
    empty = np.bincount(atom_of_node, weights=weights, minlength=num_atoms) <= 0.0
    weights = np.where(empty[atom_of_node], 1.0, weights)
  total = np.bincount(atom_of_node, weights=weights, minlength=num_atoms)
  voxel_size = box / grid
  positions = np.stack([
      np.bincount(atom_of_node, weights=weights * (index + 0.5), minlength=num_atoms)
      for index in (i, j, k)], axis=-1) * (voxel_size / np.maximum(total, 1e-30))[:, None]
  on_face = (np.minimum.reduce([i, j, k]) == 0) | (np.maximum.reduce([i, j, k]) == grid - 1)
  on_boundary = np.bincount(atom_of_node, weights=on_face, minlength=num_atoms) > 0
  voxels = np.bincount(atom_of_node, minlength=num_atoms)
  structure_of_atom = np.zeros(num_atoms, np.int64)
  structure_of_atom[atom_of_node] = structure_of_voxel
  bounds = np.searchsorted(structure_of_atom, np.arange(batch + 1))
  return [unreadable[index] if index in unreadable else Atoms(
              species=atom_species[start:stop], positions=positions[start:stop],
              voxels=voxels[start:stop], on_boundary=on_boundary[start:stop])
          for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]))]


def species_grid(atoms: Atoms, grid: int, box: float, radius: float) -> np.ndarray:
  """The species grid (G, G, G) of atoms as the voxelisation draws it: each voxel whose centre
  lies within `radius` of an atom holds its Z (the nearest atom's), the others 0. Used to show
  the atoms of a rebuilt crystal in the same picture as a segmentation."""
  centres = (np.arange(grid) + 0.5) * box / grid
  points = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), axis=-1)
  result = np.zeros((grid, grid, grid), np.int32)
  nearest = np.full((grid, grid, grid), np.inf)
  for z, position in zip(atoms.species, atoms.positions):
    distance = np.linalg.norm(points - position, axis=-1)
    closer = (distance <= radius) & (distance < nearest)
    result[closer], nearest[closer] = z, distance[closer]
  return result


def segment(species: np.ndarray, box: float, *, density: np.ndarray | None = None,
            min_size: int = 3, species_radius: float = 0.5) -> Atoms:
  """`segment_batch` for one species grid (G, G, G)."""
  return segment_batch(np.asarray(species)[None], box,
                       density=None if density is None else np.asarray(density)[None],
                       min_size=min_size, species_radius=species_radius)[0]
