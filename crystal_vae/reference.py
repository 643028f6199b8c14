"""Slow float64 numpy reference for `crystal_vae.voxelize`, written independently of it.

Explicit python loops over atoms and periodic images (a unit cell's atoms each as the image
nearest the cell centre, searched over the 27 neighbouring cells); only the per-image work is
vectorised over voxels (and the cutoff test over the candidate translations). Candidates come
from a generous range derived from a bounding ball (not from `voxelize.images_per_axis`), and an atom or image is kept
when its distance to the cube is within the cutoff, as in the definition. Used by the tests and
the benchmark.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from crystal_vae import voxelize


@dataclasses.dataclass(frozen=True)
class ReferenceGrids:
  """Density (G, G, G), species (G, G, G) and, per atomic number present, the squared distance
  (Å^2) from each voxel centre to the nearest atom of that species."""

  density: np.ndarray
  species: np.ndarray
  sq_distance_by_z: dict[int, np.ndarray]


def image_translations(lattice: np.ndarray, offset: np.ndarray,
                       spec: voxelize.GridSpec) -> np.ndarray:
  """Every integer translation n whose image can come within the cutoff of the cube (superset).

  Such an image lies within sqrt(3) box + cutoff of the cube origin, so |(f + n) @ lattice| <=
  sqrt(3) box + cutoff + |offset| and |f_k + n_k| <= that times |column k of inverse(lattice)|.
  """
  radius = math.sqrt(3.0) * spec.box + spec.cutoff + np.linalg.norm(offset)
  limits = np.ceil(radius * np.linalg.norm(np.linalg.inv(lattice), axis=0)).astype(int) + 1
  ranges = [range(-int(limit), int(limit) + 1) for limit in limits]
  return np.array(list(itertools.product(*ranges)), dtype=np.float64)


def _distance_to_cube(points: np.ndarray, box: float) -> np.ndarray:
  outside = np.maximum(np.maximum(-points, points - box), 0.0)
  return np.sqrt(np.sum(outside**2, axis=-1))


def _nearest_centre(frac: np.ndarray, lattice: np.ndarray, tie: float = 1e-3) -> np.ndarray:
  """The image f + n, n in {-1, 0, 1}^3, nearest the cell centre; of images within `tie` Å of
  the nearest, the unshifted one if it is among them, else the first in itertools order."""
  images = [frac] + [frac + np.array(n) for n in itertools.product((-1, 0, 1), repeat=3)
                     if n != (0, 0, 0)]
  distances = [np.linalg.norm((image - 0.5) @ lattice) for image in images]
  nearest = min(distances)
  return next(image for image, d in zip(images, distances) if d <= nearest + tie)


def voxelize_reference(lattice: np.ndarray, frac_coords: np.ndarray, atomic_numbers: np.ndarray,
                       rotation: np.ndarray, offset: np.ndarray, spec: voxelize.GridSpec,
                       representation: str) -> ReferenceGrids:
  """Density and species of one structure placed by cube = rotation @ cartesian + offset."""
  lattice = np.asarray(lattice, np.float64)
  rotation = np.asarray(rotation, np.float64)
  offset = np.asarray(offset, np.float64)
  frac_coords = np.mod(np.asarray(frac_coords, np.float64), 1.0)
  centres = spec.voxel_centres()
  voxels = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), axis=-1)
  norm = 1.0 / (spec.sigma**3 * (2.0 * math.pi)**1.5)
  density = np.zeros((spec.grid,) * 3)
  sq_distance_by_z: dict[int, np.ndarray] = {}
  if representation == voxelize.UNIT_CELL:
    translations = np.zeros((1, 3))
  elif representation == voxelize.REPEAT:
    translations = image_translations(lattice, offset, spec)
  else:
    raise ValueError(f"unknown representation {representation!r}")
  for frac, z in zip(frac_coords, np.asarray(atomic_numbers)):
    z = int(z)
    if representation == voxelize.UNIT_CELL:  # the image nearest the cell centre
      frac = _nearest_centre(frac, lattice)
    images = (frac + translations) @ lattice @ rotation.T + offset
    images = images[_distance_to_cube(images, spec.box) <= spec.cutoff]
    nearest = sq_distance_by_z.setdefault(z, np.full((spec.grid,) * 3, np.inf))
    for image in images:
      sq_distance = np.sum((voxels - image)**2, axis=-1)
      density += z * norm * np.exp(-sq_distance / (2.0 * spec.sigma**2))
      np.minimum(nearest, sq_distance, out=nearest)
  species = np.zeros((spec.grid,) * 3, dtype=np.int32)
  best = np.full((spec.grid,) * 3, np.inf)
  for z in sorted(sq_distance_by_z):  # Increasing Z with <=: ties go to the larger Z.
    closer = (sq_distance_by_z[z] <= best) & (sq_distance_by_z[z] <= spec.species_radius**2)
    species[closer] = z
    best = np.where(closer, sq_distance_by_z[z], best)
  return ReferenceGrids(density=density, species=species, sq_distance_by_z=sq_distance_by_z)
