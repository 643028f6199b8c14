"""A rebuilt crystal made exactly symmetric, in its own frame.

Decoded densities place light atoms a few tenths of an Å off (docs/evaluation.md, "Symmetrised crystals");
the crystals they come from are symmetric. `symmetrize` finds the space-group operations that
hold within `symprec` Å (spglib, as pymatgen's `SpacegroupAnalyzer`) and projects the sites
onto them: each site becomes the mean of its images under every operation (the operation's
permutation of the sites), and the lattice's metric the mean of its rotated metrics. Unlike
spglib's standardisation, the cell, its orientation and the origin stay (up to the small
rotation that the new metric needs), so the crystal still lies where it was decoded. The
operations are those of the cell given: a supercell keeps only the symmetry of its own lattice
(the rebuilt cells are primitive: the repeat basis is the smallest, perov_5's unit cells are).
"""

import itertools
import os
import warnings

import numpy as np
import spglib
from spglib.error import SpglibError

# spglib prints a line to stderr for each tolerance it retries on a crystal that is not
# symmetric; rebuilt crystals often are not. A value the user set wins.
os.environ.setdefault("SPGLIB_WARNING", "OFF")

_NEIGHBOUR_CELLS = np.array(list(itertools.product((-1, 0, 1), repeat=3)), np.float64)


def _permutation(rotation: np.ndarray, translation: np.ndarray, lattice: np.ndarray,
                 species: np.ndarray, frac: np.ndarray, reach: float
                 ) -> tuple[np.ndarray, np.ndarray] | None:
  """Where one operation sends each site: (target site, fractional displacement from it), or
  None when two sites land on one or a site lands farther than `reach` Å from any of its
  species."""
  moved = frac @ rotation.T + translation
  offset = moved[:, None, :] - frac[None, :, :]  # [site, candidate target]
  offset -= np.round(offset)
  # The nearest image: within the neighbouring cells of the rounded one (skewed cells too).
  images = offset[:, :, None, :] + _NEIGHBOUR_CELLS  # [site, target, cell, 3]
  distances = np.linalg.norm(images @ lattice, axis=-1)
  nearest = np.argmin(distances, axis=-1)
  offset = np.take_along_axis(images, nearest[..., None, None], axis=2)[:, :, 0]
  distance = np.take_along_axis(distances, nearest[..., None], axis=2)[..., 0]
  distance[species[:, None] != species[None, :]] = np.inf
  target = np.argmin(distance, axis=1)
  sites = np.arange(len(frac))
  if np.unique(target).size != len(frac) or np.any(distance[sites, target] > reach):
    return None
  return target, offset[sites, target]


def symmetrize(lattice: np.ndarray, species: np.ndarray, frac: np.ndarray, symprec: float
               ) -> tuple[np.ndarray, np.ndarray]:
  """(lattice rows, fractional sites in [0, 1)) made symmetric under the operations spglib
  finds within `symprec` Å; unchanged when `symprec` <= 0 (off), when spglib finds no operation
  beyond the identity (or fails: atoms on top of each other, a flat cell), or when an operation
  does not permute the sites (within 2 × `symprec`)."""
  lattice = np.asarray(lattice, np.float64)
  frac = np.asarray(frac, np.float64)
  species = np.asarray(species)
  if symprec <= 0:
    return lattice, frac
  try:
    with warnings.catch_warnings():  # spglib 2.x: a DeprecationWarning about its error handling
      warnings.simplefilter("ignore", DeprecationWarning)
      dataset = spglib.get_symmetry_dataset((lattice, frac, species), symprec=symprec)
  except SpglibError:  # what spglib raises instead of returning None once its new handling is on
    return lattice, frac
  if dataset is None or len(dataset.rotations) == 1:
    return lattice, frac
  displacement = np.zeros_like(frac)
  for rotation, translation in zip(dataset.rotations, dataset.translations):
    mapping = _permutation(rotation, translation, lattice, species, frac, 2 * symprec)
    if mapping is None:
      return lattice, frac
    target, offset = mapping
    displacement[target] += offset
  count = len(dataset.rotations)
  new_frac = np.mod(frac + displacement / count, 1.0)
  new_frac[new_frac >= 1.0] = 0.0
  # The metric G = L Lᵀ is invariant when Rᵀ G R = G; its group mean is, and the new rows are
  # the matrix with that metric closest to the old ones (orthogonal Procrustes).
  metric = lattice @ lattice.T
  mean_metric = sum(r.T @ metric @ r for r in dataset.rotations) / count
  values, vectors = np.linalg.eigh(mean_metric)
  root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
  left, _, right = np.linalg.svd(root.T @ lattice)
  return root @ (left @ right), new_frac
