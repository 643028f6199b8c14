"""Crystals -> voxel grids of electron-like density and species, in JAX.

A crystal is placed in a cube [0, box]^3 by `cube = rotation @ cartesian + offset` with
`cartesian = frac @ lattice` (plus integer lattice translations for periodic images). Two
representations:

* "unit_cell": the atoms of one cell, each as its periodic image nearest the cell centre
  `(0.5, 0.5, 0.5) @ lattice` (`centred_frac`: the most compact cell, which stays inside the cube
  where the parallelepiped [0, 1)³ of a skewed cell does not), the cell centre at the cube centre,
  a uniformly random rotation when `rotate`.
* "repeat": the lattice tiled through the cube with every periodic image whose Gaussian reaches the
  cube (distance from the image to the cube <= cutoff_sigmas * sigma); a cell corner at the cube
  origin, or with `random_offset` shifted by `rotation @ (u @ lattice)`, u ~ U[0, 1)^3; a uniformly
  random rotation when `rotate`.

Each voxel holds the density sum_m Z_m exp(-d_m^2 / 2 sigma^2) / (sigma^3 (2 pi)^(3/2)) at its
centre and the species: Z of the nearest atom within `species_radius` (ties -> larger Z), else 0.

Gaussians of points farther than the cutoff from the cube are left out in both representations
(they change no voxel by more than exp(-cutoff_sigmas^2 / 2) of their peak).

`voxelize_batch` is jitted and vmapped over a padded batch. The number of candidate images per
lattice axis is static: `num_images_for(batch["lattice"], ...)` on the host gives a guaranteed
bound for the whole batch; inside, each atom's images start at the lowest translation that can
reach the cube. The points that reach the cube are compacted to the front and the grids are built
from them `_CHUNK` at a time in a while loop, so the (mostly unused) candidates cost little:
density by separability, (C, G*G) x (C, G) -> G^3 matrix products; species by a scatter-min over a
small window of voxels around each point within the species radius of the cube.

Command line, to look at one crystal:
  python -m crystal_vae.voxelize IN.cif --representation repeat --seed 0 --out OUT.npz --png
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import pathlib
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from crystal_vae import crystals
from crystal_vae import plots

UNIT_CELL = "unit_cell"
REPEAT = "repeat"
REPRESENTATIONS = (UNIT_CELL, REPEAT)

# Invalid points (padding atoms, images beyond the cutoff) are moved here: far enough outside
# the cube that their Gaussian underflows to 0 and their species window misses the grid.
_FAR = -1.0e6
# Points per step of the density and species loops (fastest of 32-256 on CPU).
_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """The cube [0, box]^3 (Å) split into grid^3 voxels, and the Gaussian/species parameters."""

  grid: int = 30
  box: float = 10.0
  sigma: float = 1.0
  species_radius: float = 0.5
  cutoff_sigmas: float = 5.0

  @classmethod
  def from_config(cls, voxel) -> "GridSpec":
    """The spec of a config's `voxel` section."""
    return cls(grid=voxel.grid, box=voxel.box, sigma=voxel.sigma,
               species_radius=voxel.species_radius, cutoff_sigmas=voxel.cutoff_sigmas)

  @property
  def voxel_size(self) -> float:
    return self.box / self.grid

  @property
  def cutoff(self) -> float:
    """Distance (Å) beyond which a Gaussian is left out."""
    return self.cutoff_sigmas * self.sigma

  def voxel_centres(self) -> np.ndarray:
    """Coordinate (Å) of each voxel centre along one axis, shape (grid,)."""
    return (np.arange(self.grid) + 0.5) * self.voxel_size


def _check_representation(representation: str) -> None:
  if representation not in REPRESENTATIONS:
    raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")


def images_per_axis(lattice: np.ndarray, spec: GridSpec, representation: str,
                    rotate: bool) -> np.ndarray:
  """Upper bound on the integer translations per lattice axis reaching the cube, (..., 3).

  Fractional coordinate k of a point p is (p - offset) . v_k with v_k the k-th column of
  inverse(lattice @ rotation.T). Over the cube grown by the cutoff c it spans an interval of length
  box * |v_k|_1 + 2 c |v_k|_2, which holds at most floor(length) + 1 integers, the most over
  offsets and atom positions (exact for rotate=False). With `rotate`, |R v|_1 <= sqrt(3) |v|_2
  gives the rotation-invariant bound. "unit_cell" uses no images: (1, 1, 1).
  """
  _check_representation(representation)
  lattice = np.asarray(lattice, dtype=np.float64)
  if representation == UNIT_CELL:
    return np.ones(lattice.shape[:-2] + (3,), dtype=np.int64)
  inverse = np.linalg.pinv(lattice)  # Padding rows (all-zero lattice) get 1 image per axis.
  norm = np.linalg.norm(inverse, axis=-2)
  if rotate:
    span = (math.sqrt(3.0) * spec.box + 2.0 * spec.cutoff) * norm
  else:
    span = spec.box * np.abs(inverse).sum(axis=-2) + 2.0 * spec.cutoff * norm
  return np.floor(span).astype(np.int64) + 1


# The image counts `num_images_for` rounds up to: each distinct count compiles the voxeliser
# anew (~4 s on 2 CPU cores), while the candidates cost little (points are compacted first).
_IMAGE_COUNTS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def num_images_for(lattice: np.ndarray, spec: GridSpec, representation: str,
                   rotate: bool) -> tuple[int, int, int]:
  """The static `num_images` for a batch of lattices (B, 3, 3): the batch's largest count on any
  axis, rounded up to the next of `_IMAGE_COUNTS`, on all three axes, so that a run compiles the
  voxeliser a few times, not once per batch (e.g. 3 shapes in 300 batches of prototypes, 14 with
  per-axis even counts)."""
  largest = int(images_per_axis(lattice, spec, representation, rotate).max())
  count = next((count for count in _IMAGE_COUNTS if count >= largest), largest)
  return (count,) * 3


def random_rotation(key: jax.Array) -> jax.Array:
  """A uniformly random rotation matrix (Haar measure on SO(3)) from a random unit quaternion."""
  quaternion = jax.random.normal(key, (4,))
  w, x, y, z = quaternion / jnp.linalg.norm(quaternion)
  return jnp.array([
      [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
  ])


def _placement(lattice: jax.Array, key: jax.Array, spec: GridSpec, representation: str,
               rotate: bool, random_offset: bool) -> tuple[jax.Array, jax.Array]:
  """The (rotation, offset) with cube coordinates = rotation @ cartesian + offset."""
  rotation_key, offset_key = jax.random.split(key)
  rotation = random_rotation(rotation_key) if rotate else jnp.eye(3)
  if representation == UNIT_CELL:
    offset = spec.box / 2 - rotation @ (0.5 * lattice.sum(axis=0))
  elif random_offset:
    offset = rotation @ (jax.random.uniform(offset_key, (3,)) @ lattice)
  else:
    offset = jnp.zeros(3)
  return rotation, offset


# Integer shifts searched for each atom's image nearest the cell centre (enough for a reduced
# cell), no shift first: of images equally near (an atom on the boundary of the most compact
# cell, e.g. at a cubic cell's corner), the first within `_TIE` Å of the nearest is taken.
_NEIGHBOUR_SHIFTS = np.array(sorted(itertools.product((-1, 0, 1), repeat=3),
                                    key=lambda shift: shift != (0, 0, 0)), np.float32)
_TIE = 1e-3


def centred_frac(frac_coords: jax.Array, lattice: jax.Array) -> jax.Array:
  """Fractional coordinates (A, 3) of each atom's periodic image nearest the cell centre
  (0.5, 0.5, 0.5) @ lattice: wrapped into [0, 1), then shifted by the n in {-1, 0, 1}³ that
  brings it closest (Cartesian distance; ties keep the wrapped image). Works on numpy and JAX
  arrays alike."""
  frac = frac_coords - jnp.floor(frac_coords)
  candidates = frac[:, None, :] + _NEIGHBOUR_SHIFTS[None]  # (A, 27, 3)
  distance = jnp.linalg.norm((candidates - 0.5) @ lattice, axis=-1)
  nearest = distance <= distance.min(axis=1, keepdims=True) + _TIE
  return candidates[jnp.arange(candidates.shape[0]), jnp.argmax(nearest, axis=1)]


def _points(lattice: jax.Array, frac_coords: jax.Array, atomic_numbers: jax.Array,
            atom_mask: jax.Array, rotation: jax.Array, offset: jax.Array, spec: GridSpec,
            representation: str, num_images: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
  """Cube coordinates (P, 3) of every atom or candidate image and their Z (P,); padding -> _FAR."""
  basis = lattice @ rotation.T  # Rows: rotated lattice vectors.
  frac = frac_coords - jnp.floor(frac_coords)
  if representation == UNIT_CELL:
    frac = centred_frac(frac, lattice)
  points = (frac @ basis + offset)[:, None, :]  # (A, 1, 3)
  if representation == REPEAT:
    # Column k of `inverse` is the gradient of fractional coordinate k in cube coordinates, so its
    # lowest value over the cube grown by the cutoff bounds each atom's first translation.
    inverse = jnp.linalg.inv(basis)
    lowest = (spec.box * jnp.minimum(inverse, 0.0).sum(axis=0) - offset @ inverse
              - spec.cutoff * jnp.linalg.norm(inverse, axis=0))
    first = jnp.ceil(lowest - frac)  # (A, 3)
    steps = np.indices(num_images).reshape(3, -1).T  # (M, 3)
    translations = first[:, None, :] + steps[None].astype(np.float32)  # (A, M, 3)
    points = points + jnp.einsum("amk,kj->amj", translations, basis,
                                 precision=jax.lax.Precision.HIGHEST)
  # After the translations: padding rows may have an all-zero lattice, hence NaN translations.
  points = jnp.where(atom_mask[:, None, None], points, _FAR)
  numbers = jnp.broadcast_to(atomic_numbers[:, None], points.shape[:2])
  return points.reshape(-1, 3), numbers.reshape(-1)


def _compact(points: jax.Array, numbers: jax.Array, spec: GridSpec,
             chunk: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Moves the points within the species radius of the cube first, then the others within the
  cutoff (the rest is dropped, padding to a multiple of `chunk` sits at _FAR); returns them with
  the number within the cutoff (for the density) and within the radius (for the species)."""
  outside = jnp.maximum(jnp.maximum(-points, points - spec.box), 0.0)
  sq_distance = jnp.sum(outside**2, axis=-1)
  near = sq_distance <= spec.species_radius**2
  reaching = (sq_distance <= spec.cutoff**2) & ~near
  num_near = jnp.sum(near)
  size = points.shape[0] + (-points.shape[0] % chunk)
  position = jnp.where(near, jnp.cumsum(near) - 1,
                       jnp.where(reaching, num_near + jnp.cumsum(reaching) - 1, size))
  points = jnp.full((size, 3), _FAR).at[position].set(points, mode="drop", unique_indices=True)
  numbers = jnp.zeros(size, jnp.int32).at[position].set(numbers, mode="drop", unique_indices=True)
  return points, numbers, num_near + jnp.sum(reaching), num_near


def _over_chunks(update, init, count: jax.Array, points: jax.Array, numbers: jax.Array,
                 chunk: int):
  """Folds `update(state, points, numbers)` over the first `count` points, `chunk` at a time."""
  def body(carry):
    start, state = carry
    chunk_points = jax.lax.dynamic_slice_in_dim(points, start, chunk)
    chunk_numbers = jax.lax.dynamic_slice_in_dim(numbers, start, chunk)
    return start + chunk, update(state, chunk_points, chunk_numbers)
  return jax.lax.while_loop(lambda carry: carry[0] < count, body, (0, init))[1]


def _density(points: jax.Array, numbers: jax.Array, count: jax.Array, spec: GridSpec,
             chunk: int) -> jax.Array:
  """Sum of the Z-weighted normalised Gaussians of the first `count` points, by separability:
  per chunk, 1-D factors (C, 3, G), then (w * g_x outer g_y) (C, G*G) x g_z (C, G) -> G^3."""
  centres = jnp.asarray(spec.voxel_centres(), jnp.float32)
  norm = 1.0 / (spec.sigma**3 * (2.0 * math.pi)**1.5)

  def update(density, chunk_points, chunk_numbers):
    factors = jnp.exp(-(centres - chunk_points[:, :, None])**2 / (2.0 * spec.sigma**2))
    weights = chunk_numbers.astype(jnp.float32) * norm
    xy = (weights[:, None, None] * factors[:, 0, :, None] * factors[:, 1, None, :])
    xy = xy.reshape(chunk, spec.grid * spec.grid)
    return density + jnp.einsum("pq,pk->qk", xy, factors[:, 2],
                                precision=jax.lax.Precision.HIGHEST)

  density = _over_chunks(update, jnp.zeros((spec.grid**2, spec.grid)), count, points, numbers,
                         chunk)
  return density.reshape(spec.grid, spec.grid, spec.grid)


# Species keys: squared distance / radius^2 quantised to 2^-23 (float32 resolution near the
# radius), times 128, plus 127 - Z; the smallest key is the nearest atom, ties -> larger Z, all in
# one int32 scatter-min.
_DISTANCE_STEPS = 2**23
_Z_SLOTS = 128


def _species(points: jax.Array, numbers: jax.Array, count: jax.Array, spec: GridSpec,
             chunk: int) -> jax.Array:
  """Z of the nearest of the first `count` points within species_radius (ties -> larger Z), else 0.

  Each point visits the voxels of a small window around it (the voxel centres within the radius
  along each axis: floor(2 r / h) + 1 of them) and scatter-mins a key ordering by distance, then
  by larger Z. Needs Z < 128.
  """
  grid, h, radius = spec.grid, spec.voxel_size, spec.species_radius
  width = math.floor(2 * radius * grid / spec.box) + 1
  window = np.indices((width,) * 3).reshape(3, -1).T  # (W, 3)
  empty = np.iinfo(np.int32).max

  def update(keys, chunk_points, chunk_numbers):
    first = jnp.ceil((chunk_points - radius) / h - 0.5).astype(jnp.int32)  # (C, 3)
    index = first[:, None, :] + window[None]  # (C, W, 3)
    sq_distance = jnp.sum(((index + 0.5) * h - chunk_points[:, None, :])**2, axis=-1)
    inside = jnp.all((index >= 0) & (index < grid), axis=-1) & (sq_distance <= radius**2)
    flat = jnp.where(inside, (index[..., 0] * grid + index[..., 1]) * grid + index[..., 2],
                     grid**3)
    steps = jnp.minimum(sq_distance * (_DISTANCE_STEPS / radius**2), _DISTANCE_STEPS)
    key = steps.astype(jnp.int32) * _Z_SLOTS + (_Z_SLOTS - 1 - chunk_numbers[:, None])
    return keys.at[flat].min(key, mode="drop")

  keys = _over_chunks(update, jnp.full(grid**3, empty, jnp.int32), count, points, numbers, chunk)
  species = jnp.where(keys == empty, 0, _Z_SLOTS - 1 - keys % _Z_SLOTS)
  return species.reshape(grid, grid, grid)


def voxelize_one(lattice: jax.Array, frac_coords: jax.Array, atomic_numbers: jax.Array,
                 atom_mask: jax.Array, key: jax.Array, *, spec: GridSpec, representation: str,
                 rotate: bool, random_offset: bool,
                 num_images: tuple[int, int, int]) -> dict[str, jax.Array]:
  """Voxelises one padded structure: lattice (3, 3), frac_coords (A, 3), atomic_numbers (A,),
  atom_mask (A,). Returns density f32 (G, G, G), species i32 (G, G, G), rotation (3, 3),
  offset (3,). `random_offset` applies to "repeat" only; `num_images` is unused by "unit_cell".
  """
  lattice = lattice.astype(jnp.float32)
  rotation, offset = _placement(lattice, key, spec, representation, rotate, random_offset)
  points, numbers = _points(lattice, frac_coords.astype(jnp.float32),
                            atomic_numbers.astype(jnp.int32), atom_mask.astype(bool),
                            rotation, offset, spec, representation, num_images)
  chunk = min(_CHUNK, points.shape[0])
  points, numbers, num_reaching, num_near = _compact(points, numbers, spec, chunk)
  return dict(density=_density(points, numbers, num_reaching, spec, chunk),
              species=_species(points, numbers, num_near, spec, chunk),
              rotation=rotation, offset=offset)


@functools.partial(jax.jit, static_argnames=("spec", "representation", "rotate",
                                             "random_offset", "num_images"))
def _voxelize_arrays(lattice, frac_coords, atomic_numbers, atom_mask, key, *, spec,
                     representation, rotate, random_offset, num_images):
  keys = jax.random.split(key, lattice.shape[0])
  one = functools.partial(voxelize_one, spec=spec, representation=representation, rotate=rotate,
                          random_offset=random_offset, num_images=num_images)
  return jax.vmap(one)(lattice, frac_coords, atomic_numbers, atom_mask, keys)


def voxelize_batch(batch: dict[str, jax.Array], key: jax.Array, *, spec: GridSpec,
                   representation: str, rotate: bool, random_offset: bool,
                   num_images: tuple[int, int, int] = (1, 1, 1)) -> dict[str, jax.Array]:
  """Voxelises a padded batch (lattice, frac_coords, atomic_numbers, atom_mask; see the contract).

  Jitted and vmapped, one independent key per structure. For "repeat", `num_images` must bound
  every structure: use `num_images_for(batch["lattice"], spec, representation, rotate)`.
  Returns density (B, G, G, G), species (B, G, G, G), rotation (B, 3, 3), offset (B, 3).
  """
  _check_representation(representation)
  if representation == UNIT_CELL:
    num_images = (1, 1, 1)
  return _voxelize_arrays(batch["lattice"], batch["frac_coords"], batch["atomic_numbers"],
                          batch["atom_mask"], key, spec=spec, representation=representation,
                          rotate=bool(rotate), random_offset=bool(random_offset),
                          num_images=tuple(int(n) for n in num_images))


def voxelize_crystal(crystal: crystals.Crystal, seed: int, *, spec: GridSpec,
                     representation: str, rotate: bool,
                     random_offset: bool) -> dict[str, np.ndarray]:
  """Voxelises one `Crystal` (a batch of one); returns numpy arrays without the batch axis."""
  batch = dict(lattice=crystal.lattice[None].astype(np.float32),
               frac_coords=crystal.frac_coords[None].astype(np.float32),
               atomic_numbers=crystal.atomic_numbers[None].astype(np.int32),
               atom_mask=np.ones((1, crystal.num_atoms), bool))
  result = voxelize_batch(
      batch, jax.random.key(seed), spec=spec, representation=representation, rotate=rotate,
      random_offset=random_offset,
      num_images=num_images_for(batch["lattice"], spec, representation, rotate))
  return {name: np.asarray(value[0]) for name, value in result.items()}


def _define_flags() -> None:
  flags.DEFINE_enum("representation", REPEAT, REPRESENTATIONS, "Voxel representation.")
  flags.DEFINE_integer("seed", 0, "Seed of the random rotation and offset.")
  flags.DEFINE_bool("rotate", False, "Uniformly random rotation.")
  flags.DEFINE_bool("random_offset", False, "Random lattice offset (repeat only).")
  flags.DEFINE_integer("grid", GridSpec.grid, "Voxels per axis.")
  flags.DEFINE_float("box", GridSpec.box, "Cube side (Å); also the largest allowed cell side.")
  flags.DEFINE_float("sigma", GridSpec.sigma, "Gaussian width (Å).")
  flags.DEFINE_float("species_radius", GridSpec.species_radius, "Species radius (Å).")
  flags.DEFINE_string("out", None, "Output .npz (default: IN with suffix .npz).")
  flags.DEFINE_bool("png", False, "Also save a PNG of density slices next to --out.")


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m crystal_vae.voxelize IN.cif [--flags]")
  config = flags.FLAGS
  path = pathlib.Path(argv[1])
  spec = GridSpec(grid=config.grid, box=config.box, sigma=config.sigma,
                  species_radius=config.species_radius)
  try:
    crystal = crystals.read_cif_file(path, crystals.CrystalLimits(box=spec.box))
  except crystals.RejectedCrystal as error:
    message = f"error: {path}: {error.reason}: {error.detail}"
    sys.exit(" ".join(message.split()))
  result = voxelize_crystal(crystal, config.seed, spec=spec,
                            representation=config.representation, rotate=config.rotate,
                            random_offset=config.random_offset)
  out = pathlib.Path(config.out) if config.out else path.with_suffix(".npz")
  np.savez(out, **result, box=spec.box, grid=spec.grid, sigma=spec.sigma,
           species_radius=spec.species_radius, representation=config.representation,
           voxel_centres=spec.voxel_centres(), lattice=crystal.lattice,
           frac_coords=crystal.frac_coords, atomic_numbers=crystal.atomic_numbers)
  print(f"wrote {out}")
  if config.png:
    png = out.with_suffix(".png")
    plots.plot_slices(result["density"], result["species"], spec, png,
                      f"{crystal.id} ({config.representation})")
    print(f"wrote {png}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
