"""A trained model restored from a workdir: voxelise, encode, decode, segment, rebuild crystals.

Every mode other than `train` runs on one such model (`for_mode`): the checkpoint's own config
decides the representation, grid, model and dataset.

    model = inference.TrainedModel.restore("workdir")
    grids = model.voxelize(crystals)                  # true density, species, composition
    mean, logvar = model.encode(grids["density"], composition=grids["composition"])
    decoded = model.decode(mean)                      # density, species (+ lattice, composition)
    reconstructions = model.to_crystals(decoded)      # pymatgen Structures or reasons
    mean, decoded = model.reconstruct(grids)          # the same, the latent refined if the
                                                      # config says so (`eval.refine_steps`)
"""

import collections
import dataclasses
import functools
import pathlib
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import threadpoolctl

from crystal_vae import checkpoints
from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae import density_fit
from crystal_vae import losses
from crystal_vae import models
from crystal_vae import reconstruction
from crystal_vae import segmentation
from crystal_vae import voxelize


def _one_blas_thread() -> threadpoolctl.threadpool_limits:
  """The density fits are many small matrix products: BLAS threads only contend with each other
  and with XLA's (3.7x slower per crystal on 2 busy cores), so one thread does them."""
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def dataset_on_this_machine(dataset: ml_collections.ConfigDict) -> bool:
  """Whether `dataset` can be read here without a network: embedded, or a directory that exists."""
  if dataset.path:
    return pathlib.Path(dataset.path).expanduser().is_dir()
  return dataset.name in ("prototypes", *datasets.EMBEDDED)


def embedded_dataset(dataset: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`dataset` with the embedded perov_5 crystals as its source, its limits kept."""
  replaced = ml_collections.ConfigDict(dataset.to_dict())
  replaced.name, replaced.path = "perov_5", ""
  return replaced


class ConfigMismatch(ValueError):
  """A `--config` that describes another model than the checkpoint it is used with."""


class SettingsError(ValueError):
  """A mode's settings that cannot run on this model (the command line says it in one line)."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """The config, variables and jitted pure functions of a trained `CrystalVAE`.

  With `variables=None` only the config-driven steps (voxelize, atoms, to_crystals) are usable.
  """

  config: ml_collections.ConfigDict
  variables: Any
  workdir: pathlib.Path | None = None  # where it was restored from (its latent prior is kept there)
  step: int | None = None  # its checkpoint's step

  @classmethod
  def restore(cls, workdir: str | pathlib.Path, step: int | None = None) -> "TrainedModel":
    """Restores checkpoint `step` (default: the latest) and the config saved with it."""
    manager = checkpoints.checkpoint_manager(workdir, read_only=True)
    config = checkpoints.restore_config(manager, step)
    abstract = jax.eval_shape(lambda: models.init_variables(config, jax.random.key(0)))
    # Restore onto this machine's first device, whatever devices the run was trained on.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            abstract)
    step, variables = checkpoints.restore_variables(manager, abstract, step)
    return cls(config, variables, pathlib.Path(workdir), step)

  @classmethod
  def for_mode(cls, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
               dataset_given: bool) -> "TrainedModel":
    """The model a mode runs on: the latest checkpoint in `workdir` with its own config, taking
    from `config` (the command line's) only the `eval` settings (how atoms are read) and, when
    `dataset_given` (a `--config.dataset.*` flag), the dataset, said in one log line. A `config`
    of another representation, grid or model is refused (`ConfigMismatch`). The oracle
    (`config.eval.oracle`) needs no checkpoint: it is `config` alone."""
    if config.eval.oracle:
      return cls(config, variables=None)
    model = cls.restore(workdir)
    saved = model.config
    mismatch = [name for name, of in (("representation", lambda c: c.representation),
                                      ("grid", lambda c: voxelize.GridSpec.from_config(c.voxel)),
                                      ("max_z", lambda c: c.dataset.max_z))
                if of(config) != of(saved)]
    # Settings that do not change the layers (conv_impl, dtype) differ freely.
    if (not mismatch and config.model.to_dict() != saved.model.to_dict()
        and _shapes(config) != _shapes(saved)):
      mismatch = ["model"]
    if mismatch:
      raise ConfigMismatch(
          f"--config describes another model than the checkpoint in {workdir} (different "
          f"{', '.join(mismatch)}; it holds a {saved.representation} model): leave --config out "
          "to use the checkpoint's own, with --config.<mode>.* overrides")
    resolved = ml_collections.ConfigDict(saved.to_dict())
    resolved.eval = config.eval
    if not saved.model.segmenter and config.eval.atoms_from != "density":
      raise SettingsError(
          f"the model in {workdir} has no segmenter (model.segmenter=False): it reads the atoms"
          " off the decoded density only (--config.eval.atoms_from=density)")
    if dataset_given and config.dataset.to_dict() != saved.dataset.to_dict():
      logging.info("dataset from the command line: %s (%s); the model was trained on %s (%s)",
                   config.dataset.name, config.dataset.path or "embedded", saved.dataset.name,
                   saved.dataset.path or "embedded")
      resolved.dataset = config.dataset
    elif not dataset_given and not dataset_on_this_machine(saved.dataset):
      resolved.dataset = embedded_dataset(saved.dataset)
      print(f"note: the dataset this model was trained on ({saved.dataset.name}"
            f"{', ' + saved.dataset.path if saved.dataset.path else ''}) is not on this machine: "
            "using the embedded perov_5 crystals (give yours with --config.dataset.path=DIR)",
            flush=True)
    return dataclasses.replace(model, config=resolved)

  @property
  def spec(self) -> voxelize.GridSpec:
    return voxelize.GridSpec.from_config(self.config.voxel)

  @functools.cached_property
  def _apply(self):
    model = models.model_from_config(self.config)
    return jax.jit(model.apply, static_argnames=("method", "train"))

  def voxelize(self, structures: Sequence[crystals.Crystal], *, seed: int = 0
               ) -> dict[str, np.ndarray]:
    """True grids as at evaluation: unrotated (lattice in the standard orientation), a repeat
    cube with a cell corner at its origin, a unit cell at its centre; with `composition` (the
    fraction of each crystal's atoms per Z)."""
    batch = crystals.stack_crystals(structures, self.config.dataset.max_atoms)
    grids = voxelize.voxelize_batch(
        batch, jax.random.key(seed), spec=self.spec, representation=self.config.representation,
        rotate=False, random_offset=False,
        num_images=voxelize.num_images_for(batch["lattice"], self.spec,
                                           self.config.representation, rotate=False))
    grids["composition"] = losses.composition_fractions(
        batch["atomic_numbers"], batch["atom_mask"], self.config.dataset.max_z + 1)
    return {key: np.asarray(value) for key, value in grids.items()}

  def condition(self, density: np.ndarray) -> jax.Array | None:
    """The conditional VAE's per-sample scale (the maximum density), None otherwise."""
    if not self.config.model.conditional:
      return None
    return jnp.max(jnp.asarray(density), axis=(1, 2, 3))

  def encode(self, density: np.ndarray, condition: np.ndarray | None = None,
             composition: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latent mean and log-variance, (B, L) each. A model with a composition head also reads
    the crystals' `composition` (`voxelize` gives it); other models ignore it."""
    if condition is None:
      condition = self.condition(density)
    if not self.config.model.composition_head:
      composition = None
    elif composition is None:
      raise ValueError("this model encodes the composition with the density: pass"
                       " composition=grids['composition'] from `voxelize`")
    mean, logvar = self._apply(self.variables, jnp.asarray(density), train=False,
                               condition=condition, composition=composition, method="encode")
    return np.asarray(mean), np.asarray(logvar)

  def decode(self, z: np.ndarray, condition: np.ndarray | None = None,
             batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Latents (N, L) -> decoded `density`, segmented `species` (all 0 without a segmenter),
    `lattice` (a lattice head) and `composition` (fractions per Z, with a composition head); with
    `batch_size`, in batches padded to that size (one compilation whatever N)."""
    if batch_size is None:
      return self._decode(z, condition)
    z = np.asarray(z, np.float32)
    parts = collections.defaultdict(list)
    for begin in range(0, z.shape[0], batch_size):
      count = min(batch_size, z.shape[0] - begin)
      pad = ((0, batch_size - count), (0, 0))
      chunk_condition = None
      if condition is not None:
        chunk_condition = np.pad(np.asarray(condition, np.float32)[begin:begin + batch_size],
                                 pad[:1], constant_values=1.0)
      decoded = self._decode(np.pad(z[begin:begin + batch_size], pad), chunk_condition)
      for key, value in decoded.items():
        parts[key].append(value[:count])
    return {key: np.concatenate(value) for key, value in parts.items()}

  def refine(self, z: np.ndarray, density: np.ndarray, condition: np.ndarray | None = None, *,
             steps: int, learning_rate: float) -> np.ndarray:
    """Latents (N, L) after `steps` Adam steps that lower the voxel MSE between their decoded
    density and `density` (N, G, G, G), each crystal's independently: from the encoder's mean,
    a closer reconstruction of a given crystal than the mean's."""
    if steps <= 0:
      return np.asarray(z)
    refined = self._refine(jnp.asarray(z, jnp.float32), jnp.asarray(density, jnp.float32),
                           None if condition is None else jnp.asarray(condition, jnp.float32),
                           jnp.float32(learning_rate), steps)
    return np.asarray(refined)

  @functools.cached_property
  def _refine(self):
    def mse(z, density, condition):
      decoded = self._apply(self.variables, z, train=False, condition=condition, method="decode")
      # Summed over the batch: each latent's gradient is its own crystal's MSE gradient.
      return jnp.sum(jnp.mean((decoded - density) ** 2, axis=(1, 2, 3)))

    def refine(z, density, condition, learning_rate, steps):
      optimizer = optax.adam(learning_rate)

      def step(carry, _):
        z, opt_state = carry
        updates, opt_state = optimizer.update(jax.grad(mse)(z, density, condition), opt_state)
        return (optax.apply_updates(z, updates), opt_state), None

      (z, _), _ = jax.lax.scan(step, (z, optimizer.init(z)), length=steps)
      return z
    return jax.jit(refine, static_argnames="steps")

  def reconstruct(self, grids: dict[str, np.ndarray]
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """True grids (`voxelize`) -> the latent means and the decoded grids, as evaluation
    reconstructs a crystal: the mean decoded, or with `eval.refine_steps` the latent refined
    towards the true density first (`refine`); the composition is always the mean's (the head
    was fitted on means)."""
    condition = self.condition(grids["density"])
    mean, _ = self.encode(grids["density"], condition, grids["composition"])
    settings = self.config.eval
    z = self.refine(mean, grids["density"], condition, steps=settings.refine_steps,
                    learning_rate=settings.refine_learning_rate)
    decoded = self.decode(z, condition)
    if settings.refine_steps > 0 and "composition" in decoded:
      decoded["composition"] = self._composition(mean)
    return mean, decoded

  def encode_crystals(self, structures: Sequence[crystals.Crystal], batch_size: int = 16
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """Latent means of crystals voxelised as at evaluation, and their conditions (or None)."""
    means, _, conditions = self.encode_posteriors(structures, batch_size)
    return means, conditions

  def encode_posteriors(self, structures: Sequence[crystals.Crystal], batch_size: int = 16
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Latent means and log-variances (N, L) of crystals voxelised as at evaluation, and their
    conditions (or None)."""
    means, logvars, conditions = [], [], []
    for begin in range(0, len(structures), batch_size):
      grids = self.voxelize(structures[begin:begin + batch_size])
      condition = self.condition(grids["density"])
      mean, logvar = self.encode(grids["density"], condition, grids["composition"])
      means.append(mean)
      logvars.append(logvar)
      conditions.append(None if condition is None else np.asarray(condition))
    conditions = None if conditions[0] is None else np.concatenate(conditions)
    return np.concatenate(means), np.concatenate(logvars), conditions

  def maximum_densities(self, structures: Sequence[crystals.Crystal], batch_size: int = 16
                        ) -> np.ndarray:
    """The conditional model's condition of each crystal: the maximum of its true density."""
    maxima = []
    for begin in range(0, len(structures), batch_size):
      density = self.voxelize(structures[begin:begin + batch_size])["density"]
      maxima.append(density.reshape(density.shape[0], -1).max(axis=1))
    return np.concatenate(maxima)

  def predict_properties(self, z: np.ndarray) -> np.ndarray:
    """The property head's predictions (N, P), in the order of `config.model.properties`, from
    latents (for crystals: their latent means, as in training)."""
    return np.asarray(self._apply(self.variables, jnp.asarray(z, jnp.float32),
                                  method="predict_properties"))

  @functools.cached_property
  def _property_gradient(self):
    def total(z, index):
      predictions = self._apply(self.variables, z, method="predict_properties")
      return jnp.sum(predictions[:, index]), predictions
    return jax.jit(jax.value_and_grad(total, has_aux=True))

  def property_gradient(self, z: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The predictions (N, P) at the latents and d property[index] / dz (N, L), in one pass."""
    (_, predictions), gradient = self._property_gradient(jnp.asarray(z, jnp.float32), index)
    return np.asarray(predictions), np.asarray(gradient)

  def decode_density(self, z: np.ndarray, condition: np.ndarray | None = None) -> np.ndarray:
    """Latents (N, L) -> the decoded density alone (N, G, G, G): `decode` without the segmenter
    and the heads."""
    if self.config.model.conditional and condition is None:
      raise ValueError("a conditional model needs a condition (target maximum density)")
    condition = None if condition is None else jnp.asarray(condition, jnp.float32)
    return np.asarray(self._apply(self.variables, jnp.asarray(z, jnp.float32), train=False,
                                  condition=condition, method="decode"))

  def _decode(self, z: np.ndarray, condition: np.ndarray | None) -> dict[str, np.ndarray]:
    density = self.decode_density(z, condition)
    if self.config.model.segmenter:
      species = np.asarray(self._apply(self.variables, density, method="segment_species"))
    else:  # nothing segmented: the atoms are read off the density (`species_to_show`)
      species = np.zeros(density.shape, np.int32)
    decoded = {"density": np.asarray(density), "species": species}
    if self.config.model.lattice_head:
      decoded["lattice"] = np.asarray(self._apply(self.variables, z, method="predict_lattice"))
    if self.config.model.composition_head:
      decoded["composition"] = self._composition(z)
    return decoded

  def _composition(self, z: jax.Array) -> np.ndarray:
    """The composition head's fractions per Z, (N, max_z + 1)."""
    logits = self._apply(self.variables, z, method="predict_composition")
    return np.asarray(jax.nn.softmax(logits))

  @property
  def fits_density(self) -> bool:
    """Whether atoms are read off the decoded density (`eval.atoms_from`) or segmented."""
    return self.config.eval.atoms_from == "density"

  @property
  def fits_repeat_cube(self) -> bool:
    """Whether a repeat cube's lattice, sites and Z come from the density alone (no segmenting)."""
    return self.fits_density and self.config.representation == "repeat"

  def atoms(self, grids: dict[str, np.ndarray]) -> list[segmentation.Atoms]:
    """The atoms of each cube: for a unit cell fitting the density, read off the density alone
    (`density_fit.atoms_from_density`); else the connected components (of at least
    `eval.min_component_size` voxels) of the species grids, at their density-weighted centres."""
    if self.fits_density and self.config.representation == "unit_cell":
      with _one_blas_thread():
        return [density_fit.atoms_from_density(density, self.spec.box, self.spec.sigma,
                                                self.config.dataset.max_z,
                                                min_z=self.config.eval.min_site_z)
                for density in grids["density"]]
    return segmentation.segment_batch(grids["species"], self.spec.box, density=grids["density"],
                                      min_size=self.config.eval.min_component_size,
                                      species_radius=self.spec.species_radius)

  def species_to_show(self, grids: dict[str, np.ndarray],
                      rebuilt: Sequence[reconstruction.Reconstruction]) -> np.ndarray:
    """The species grids a figure overlays on decoded densities: the atoms of the rebuilt
    crystals where they were read off the density (a repeat cube), else the segmentation."""
    if not self.fits_repeat_cube:
      return grids["species"]
    spec = self.spec
    return np.stack([
        segmentation.species_grid(r.cube_atoms, spec.grid, spec.box, spec.species_radius)
        if r.cube_atoms is not None else np.zeros_like(species)
        for r, species in zip(rebuilt, grids["species"])])

  def to_crystals(self, grids: dict[str, np.ndarray], atoms: list[segmentation.Atoms] | None = None
                  ) -> list[reconstruction.Reconstruction]:
    """Decoded (or true) grids -> crystals; invalid ones carry their reason. With a decoded
    `composition` the species follow it (`species_choice.species_from_composition`) unless
    `eval.species_from_composition` is off, except in the repeat representation read off
    segmented atoms, whose cube holds many cells."""
    with _one_blas_thread():
      return self._to_crystals(grids, atoms)

  def _to_crystals(self, grids: dict[str, np.ndarray], atoms: list[segmentation.Atoms] | None
                   ) -> list[reconstruction.Reconstruction]:
    use_composition = (self.config.model.composition_head
                       and self.config.eval.species_from_composition)
    compositions = grids["composition"] if use_composition else [None] * len(grids["density"])
    lattices = grids.get("lattice", [None] * len(grids["density"]))
    if self.fits_repeat_cube:
      return [reconstruction.reconstruct_repeat_from_density(
          density_fit.DensityFit(density, self.spec.box, self.spec.sigma, self.spec.cutoff),
          max_z=self.config.dataset.max_z, min_z=self.config.eval.min_site_z,
          composition=composition, site_z_sigma=self.config.eval.site_z_sigma, lattice=lattice,
          symprec=self.config.eval.symprec)
              for density, composition, lattice in zip(grids["density"], compositions, lattices)]
    atoms = self.atoms(grids) if atoms is None else atoms
    if self.config.representation == "repeat":
      return [reconstruction.reconstruct_repeat(a, self.spec.box, density=density, lattice=lattice,
                                                symprec=self.config.eval.symprec)
              for a, density, lattice in zip(atoms, grids["density"], lattices)]
    if "lattice" not in grids:
      raise ValueError("unit-cell grids need a lattice (the model's lattice head)")
    return [reconstruction.reconstruct_unit_cell(a, lattice, self.spec.box,
                                                 composition=composition,
                                                 site_z_sigma=self.config.eval.site_z_sigma,
                                                 fitted_z=self.fits_density,
                                                 symprec=self.config.eval.symprec)
            for a, lattice, composition in zip(atoms, grids["lattice"], compositions)]


def _shapes(config: ml_collections.ConfigDict) -> list[tuple[tuple[int, ...], Any]]:
  """The shapes of the model's variables: what a checkpoint can be restored into."""
  abstract = jax.eval_shape(lambda: models.init_variables(config, jax.random.key(0)))
  return [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(abstract)]
