"""Generation with a trained model: random draws, latent interpolation and latent traversal.

Three `--mode`s, each `(model, settings, out_dir) -> summary` like every mode (main.py): the
restored model (its config decides representation, grid and dataset), the mode's own settings
(`config.<mode>`) and the folder it writes (`workdir/<mode>/`):

* `sample` (paper §4.4, Fig. 9): `config.sample.num` latents z ~ N(0, 1) · temperature from
  `config.sample.seed`, decoded, segmented and rebuilt into crystals. Writes `cifs/` (+
  `invalid.csv`), `gallery.png` (a density slice of each sample with its segmentation),
  `nearest_neighbours.png` (nearest-neighbour interatomic distances of the valid samples against
  training crystals, Fig. 9A) and `summary.json`:
  - `valid_fraction`: reconstructions that are crystals (at least one atom, sites >= 0.5 Å apart);
  - `composition_valid_fraction`: samples that are crystals with a charge-neutral composition by
    SMACT (CDVAE's `smact_validity`, see `smact_valid`), and the same among the valid ones;
  - `wasserstein_density` (g/cm³) and `wasserstein_num_elements`: between the valid samples and
    `config.sample.num_train_structures` training crystals (scipy.stats.wasserstein_distance).
* `interpolate` (Fig. 8): encodes `config.interpolate.start` and `.end` (CIF paths or dataset
  ids; empty = the first / second training crystal) to their latent means and decodes
  `config.interpolate.steps` points on the line between them, linear and spherical (slerp).
  Writes `<method>/cifs/step_XX.cif`, `panel.png`, `interpolation.gif`, `summary.json`.
* `traverse` (Fig. 10D): encodes `config.traverse.crystal` and sets latent coordinate
  `config.traverse.dim` to `steps` values from `low` to `high`; writes `traverse.png`,
  `summary.json`.

A conditional model (`config.model.conditional`) decodes random latents with the maximum
densities of training crystals drawn at random as conditions, and interpolates the condition
linearly between the two endpoints' own.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import math
import pathlib
import warnings
from collections.abc import Sequence

from absl import logging
import ml_collections
import numpy as np
from pymatgen.core import Element, Structure
from scipy import stats
import smact
from smact import screening

from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae import inference
from crystal_vae import reconstruction
from crystal_vae import voxelize

METHODS = ("linear", "slerp")


# ---------------------------------------------------------------------------------------------
# Latents, decoding, crystals.


def random_latents(num: int, latent_dim: int, seed: int, temperature: float = 1.0) -> np.ndarray:
  """z ~ N(0, temperature²) of shape (num, latent_dim), float32, a pure function of `seed`."""
  rng = np.random.default_rng(seed)
  return (temperature * rng.standard_normal((num, latent_dim))).astype(np.float32)


def decode_in_batches(model: inference.TrainedModel, z: np.ndarray,
                      condition: np.ndarray | None = None, batch_size: int = 16
                      ) -> dict[str, np.ndarray]:
  """`model.decode` over (num, L) latents in batches padded to `batch_size` (one compilation)."""
  z = np.asarray(z, np.float32)
  parts = collections.defaultdict(list)
  for begin in range(0, z.shape[0], batch_size):
    chunk = z[begin:begin + batch_size]
    count = chunk.shape[0]
    pad = ((0, batch_size - count), (0, 0))
    chunk_condition = None
    if condition is not None:
      chunk_condition = np.pad(np.asarray(condition, np.float32)[begin:begin + batch_size],
                               pad[:1], constant_values=1.0)
    decoded = model.decode(np.pad(chunk, pad), condition=chunk_condition)
    for key, value in decoded.items():
      parts[key].append(value[:count])
  return {key: np.concatenate(value) for key, value in parts.items()}


def to_crystals(model: inference.TrainedModel, grids: dict[str, np.ndarray], min_size: int = 3
                ) -> list[reconstruction.Reconstruction]:
  """Decoded grids -> crystals (or reasons), segmenting components of at least `min_size`."""
  return model.to_crystals(grids, model.atoms(grids, min_size))


def write_cifs(reconstructions: Sequence[reconstruction.Reconstruction], ids: Sequence[str],
               directory: pathlib.Path) -> dict[str, int]:
  """CIFs of the valid reconstructions and `invalid.csv` for the rest; the counts per outcome."""
  valid, invalid = reconstruction.write_cifs(reconstructions, ids, directory)
  counts = {"valid": valid, "invalid": invalid}
  for r in reconstructions:
    if not r.valid:
      counts[f"invalid_{r.reason}"] = counts.get(f"invalid_{r.reason}", 0) + 1
  return counts


def load_crystal(name: str, config: ml_collections.ConfigDict, default_index: int = 0
                 ) -> crystals.Crystal:
  """A crystal named by a CIF path or a dataset id (searched in every split of
  `config.dataset`); an empty name is training crystal `default_index`."""
  limits = crystals.CrystalLimits(box=config.dataset.box, max_z=config.dataset.max_z,
                                  max_atoms=config.dataset.max_atoms)
  if name.endswith(".cif") or pathlib.Path(name).is_file():
    return crystals.read_cif_file(name, limits)
  sources = datasets.load_data_sources(config.dataset)
  if not name:
    return datasets.record_to_crystal(sources["train"][default_index])
  for source in sources.values():
    for index in range(len(source)):
      record = source[index]
      material_id = record["material_id"]
      if (material_id.decode() if isinstance(material_id, bytes) else str(material_id)) == name:
        return datasets.record_to_crystal(record)
  raise ValueError(f"{name!r} is neither a CIF file nor an id in dataset {config.dataset.name!r}")


def training_crystals(config: ml_collections.ConfigDict, num: int, seed: int
                      ) -> list[crystals.Crystal]:
  """Up to `num` crystals of the train split of `config.dataset`, a random subset from `seed`."""
  source = datasets.split_source(config.dataset, "train")
  chosen = np.random.default_rng(seed).permutation(len(source))[:num]
  return [datasets.record_to_crystal(source[int(i)]) for i in np.sort(chosen)]


def maximum_densities(model: inference.TrainedModel, structures: Sequence[crystals.Crystal],
                      batch_size: int = 16) -> np.ndarray:
  """The conditional model's condition of each crystal: the maximum of its true density grid."""
  maxima = []
  for begin in range(0, len(structures), batch_size):
    grids = model.voxelize(structures[begin:begin + batch_size])
    maxima.append(grids["density"].reshape(grids["density"].shape[0], -1).max(axis=1))
  return np.concatenate(maxima)


def draw_conditions(model: inference.TrainedModel, num: int, seed: int,
                    structures: Sequence[crystals.Crystal]) -> np.ndarray | None:
  """For a conditional model, `num` conditions drawn from the crystals' maximum densities."""
  if not model.config.model.conditional:
    return None
  maxima = maximum_densities(model, structures)
  return np.random.default_rng(seed).choice(maxima, size=num).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Composition validity and distribution statistics (CDVAE).


def _oxidation_states(symbol: str) -> tuple[list[int], float | None]:
  try:
    element = smact.element_dictionary((symbol,))[symbol]
  except (KeyError, NameError, ValueError):
    return [], None
  return list(element.oxidation_states or []), element.pauling_eneg


def smact_valid(atomic_numbers: Sequence[int], use_pauling_test: bool = True,
                include_alloys: bool = True) -> bool:
  """CDVAE's `smact_validity` of a composition (any multiset of atomic numbers).

  The counts are reduced by their gcd. A single element is valid; so (`include_alloys`, as in
  CDVAE) is a composition of metals only. Otherwise the composition is valid when some
  combination of the elements' SMACT oxidation states is charge neutral for the counts
  (`smact.neutral_ratios` with the counts as the only stoichiometry) and passes the Pauling
  electronegativity test (`smact.screening.pauling_test`; missing electronegativities pass).
  """
  counter = collections.Counter(int(z) for z in atomic_numbers)
  if not counter:
    return False
  numbers = sorted(counter)
  symbols = [Element.from_Z(z).symbol for z in numbers]
  if len(symbols) == 1:
    return True
  if include_alloys and all(symbol in smact.metals for symbol in symbols):
    return True
  counts = np.array([counter[z] for z in numbers])
  counts = counts // np.gcd.reduce(counts)
  states, electronegativities = zip(*[_oxidation_states(symbol) for symbol in symbols])
  stoichs = [(int(count),) for count in counts]
  for oxidation in itertools.product(*states):
    if not smact.neutral_ratios(oxidation, stoichs=stoichs, threshold=int(counts.max())):
      continue
    if not use_pauling_test:
      return True
    try:
      if screening.pauling_test(oxidation, electronegativities):
        return True
    except TypeError:  # No electronegativity data: CDVAE counts it as passing.
      return True
  return False


def nearest_neighbour_distances(structure: Structure) -> np.ndarray:
  """For each site, the distance (Å) to its nearest other site or periodic image."""
  radius = min(structure.lattice.abc) + 1e-6  # every site's own image lies within
  centres, _, _, distances = structure.get_neighbor_list(radius)
  nearest = np.full(len(structure), np.inf)
  np.minimum.at(nearest, centres, distances)
  return nearest


def _distribution_stats(samples: Sequence[Structure], reference: Sequence[Structure]
                        ) -> dict[str, float]:
  """Wasserstein distances of density (g/cm³) and of the number of elements, samples vs
  reference (NaN without samples)."""
  if not samples:
    return {"wasserstein_density": float("nan"), "wasserstein_num_elements": float("nan")}
  return {
      "wasserstein_density": float(stats.wasserstein_distance(
          [s.density for s in samples], [s.density for s in reference])),
      "wasserstein_num_elements": float(stats.wasserstein_distance(
          [len(s.composition.elements) for s in samples],
          [len(s.composition.elements) for s in reference])),
  }


def sample_summary(reconstructions: Sequence[reconstruction.Reconstruction],
                   reference: Sequence[Structure]) -> dict[str, float]:
  """Validity fractions and distribution distances of generated crystals (see module doc)."""
  valid = [r.structure for r in reconstructions if r.valid]
  composition_valid = [smact_valid(s.atomic_numbers) for s in valid]
  num = len(reconstructions)
  return {
      "num_samples": num,
      "num_valid": len(valid),
      "valid_fraction": len(valid) / num if num else float("nan"),
      "composition_valid_fraction": sum(composition_valid) / num if num else float("nan"),
      "composition_valid_fraction_of_valid": (float(np.mean(composition_valid)) if valid
                                              else float("nan")),
      **_distribution_stats(valid, reference),
  }


# ---------------------------------------------------------------------------------------------
# Latent paths.


def interpolate_latents(start: np.ndarray, end: np.ndarray, steps: int, method: str
                        ) -> np.ndarray:
  """`steps` latents from `start` to `end` (both included), t evenly spaced in [0, 1].

  linear: (1 - t) start + t end. slerp: sin((1 - t) Ω) / sin Ω · start + sin(t Ω) / sin Ω · end,
  Ω the angle between the two (the line when they are parallel).
  """
  start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
  t = np.linspace(0.0, 1.0, steps)[:, None]
  if method == "linear":
    path = (1 - t) * start + t * end
  elif method == "slerp":
    cosine = np.dot(start, end) / max(np.linalg.norm(start) * np.linalg.norm(end), 1e-12)
    omega = np.arccos(np.clip(cosine, -1.0, 1.0))
    if np.sin(omega) < 1e-6:  # (anti)parallel: the great circle is undefined, use the line.
      path = (1 - t) * start + t * end
    else:
      path = (np.sin((1 - t) * omega) * start + np.sin(t * omega) * end) / np.sin(omega)
  else:
    raise ValueError(f"interpolation method {method!r} not in {METHODS}")
  path[0], path[-1] = start, end
  return path.astype(np.float32)


def traverse_latents(z: np.ndarray, dim: int, values: Sequence[float]) -> np.ndarray:
  """Copies of `z` (L,) with coordinate `dim` set to each of `values`: (len(values), L)."""
  if not 0 <= dim < z.shape[-1]:
    raise ValueError(f"latent dimension {dim} outside [0, {z.shape[-1]})")
  path = np.repeat(np.asarray(z, np.float32)[None], len(values), axis=0)
  path[:, dim] = values
  return path


# ---------------------------------------------------------------------------------------------
# Figures.


def pyplot():
  """matplotlib.pyplot on the Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def species_colours(*species_grids: np.ndarray) -> dict[int, tuple[float, float, float]]:
  """One colour per species present in any of the grids (tab20 by rank of Z, cycling)."""
  present = sorted(set().union(*[{int(z) for z in np.unique(g)} for g in species_grids]) - {0})
  palette = pyplot().get_cmap("tab20")
  return {z: palette(rank % 20)[:3] for rank, z in enumerate(present)}


def draw_slice(axis, density: np.ndarray, species: np.ndarray, spec: voxelize.GridSpec,
               colours: dict[int, tuple[float, float, float]], index: int | None = None,
               vmax: float | None = None) -> set[int]:
  """Draws z-slice `index` (default: the middle) of a density grid with its non-zero species
  voxels overlaid in their `colours`; returns the species shown."""
  k = spec.grid // 2 if index is None else index
  extent = (0.0, spec.box, 0.0, spec.box)
  axis.imshow(density[:, :, k].T, origin="lower", extent=extent, cmap="gray_r", vmin=0.0,
              vmax=vmax or float(density.max()) or 1.0)
  shown = {int(z) for z in np.unique(species[:, :, k]) if z > 0}
  overlay = np.zeros(species.shape[:2] + (4,))
  for z in shown:
    overlay[species[:, :, k] == z] = (*colours[z], 0.55)
  axis.imshow(overlay.transpose(1, 0, 2), origin="lower", extent=extent)
  axis.set_xticks([])
  axis.set_yticks([])
  return shown


def add_species_legend(figure, colours: dict[int, tuple[float, float, float]],
                       shown: set[int]) -> None:
  """A figure legend naming the overlay colour of each species shown."""
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  handles = [patches.Patch(color=colours[z], label=Element.from_Z(z).symbol)
             for z in sorted(shown)]
  if handles:
    figure.legend(handles=handles, loc="center right", fontsize=7, ncol=1 + len(handles) // 20)


def _label(r: reconstruction.Reconstruction) -> str:
  return r.structure.composition.reduced_formula if r.valid else f"({r.reason})"


def plot_gallery(grids: dict[str, np.ndarray], reconstructions, spec: voxelize.GridSpec,
                 path: pathlib.Path, columns: int = 4) -> None:
  """A grid of panels: the middle z-slice of each sample with its segmentation."""
  plt = pyplot()
  num = grids["density"].shape[0]
  rows = max(math.ceil(num / columns), 1)
  figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
  colours, shown = species_colours(grids["species"]), set()
  for index, axis in enumerate(axes.ravel()):
    if index < num:
      shown |= draw_slice(axis, grids["density"][index], grids["species"][index], spec, colours)
      axis.set_title(f"{index}: {_label(reconstructions[index])}", fontsize=8)
    else:
      axis.axis("off")
  figure.suptitle(f"random samples, z-slice at {spec.voxel_centres()[spec.grid // 2]:.2f} Å")
  figure.tight_layout(rect=(0, 0, 0.92, 1))
  add_species_legend(figure, colours, shown)
  figure.savefig(path, dpi=90)
  plt.close(figure)


def plot_nearest_neighbours(samples: np.ndarray, reference: np.ndarray, path: pathlib.Path
                            ) -> None:
  """Normalised histograms of nearest-neighbour distances, samples vs training (Fig. 9A)."""
  plt = pyplot()
  figure, axis = plt.subplots(figsize=(5, 3.5))
  finite = [values[np.isfinite(values)] for values in (samples, reference)]
  top = max([float(v.max()) for v in finite if v.size] + [1.0])
  bins = np.linspace(0.0, top, 40)
  axis.hist(finite[1], bins=bins, density=True, alpha=0.5, label=f"training ({finite[1].size})")
  if finite[0].size:
    axis.hist(finite[0], bins=bins, density=True, alpha=0.5, label=f"samples ({finite[0].size})")
  axis.set_xlabel("nearest-neighbour distance (Å)")
  axis.set_ylabel("density")
  axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def _figure_image(figure) -> np.ndarray:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=80)
  buffer.seek(0)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.open(buffer).convert("RGB"))


def plot_path(grids_by_row: dict[str, dict[str, np.ndarray]], column_titles: Sequence[str],
              spec: voxelize.GridSpec, path: pathlib.Path, title: str) -> None:
  """Rows of middle z-slices (one row per path, one column per step), one colour scale."""
  plt = pyplot()
  rows, columns = len(grids_by_row), len(column_titles)
  vmax = max(float(g["density"].max()) for g in grids_by_row.values()) or 1.0
  figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.2 * rows + 0.4),
                              squeeze=False)
  colours = species_colours(*[g["species"] for g in grids_by_row.values()])
  shown = set()
  for row, (name, grids) in enumerate(grids_by_row.items()):
    for column in range(columns):
      axis = axes[row, column]
      shown |= draw_slice(axis, grids["density"][column], grids["species"][column], spec,
                          colours, vmax=vmax)
      axis.set_title(column_titles[column], fontsize=8)
    axes[row, 0].set_ylabel(name)
  figure.suptitle(title)
  figure.tight_layout(rect=(0, 0, 0.92, 1))
  add_species_legend(figure, colours, shown)
  figure.savefig(path, dpi=90)
  plt.close(figure)


def write_gif(grids_by_row: dict[str, dict[str, np.ndarray]], frame_titles: Sequence[str],
              spec: voxelize.GridSpec, path: pathlib.Path, seconds_per_frame: float) -> None:
  """An animated GIF: one frame per step showing each path's middle slice side by side."""
  plt = pyplot()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  vmax = max(float(g["density"].max()) for g in grids_by_row.values()) or 1.0
  colours = species_colours(*[g["species"] for g in grids_by_row.values()])
  frames = []
  for step, frame_title in enumerate(frame_titles):
    figure, axes = plt.subplots(1, len(grids_by_row), figsize=(3.0 * len(grids_by_row), 3.3),
                                squeeze=False)
    shown = set()
    for axis, (name, grids) in zip(axes[0], grids_by_row.items()):
      shown |= draw_slice(axis, grids["density"][step], grids["species"][step], spec, colours,
                          vmax=vmax)
      axis.set_title(name)
    figure.suptitle(frame_title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 0.85, 1))
    add_species_legend(figure, colours, shown)
    frames.append(Image.fromarray(_figure_image(figure)))
    plt.close(figure)
  frames[0].save(path, save_all=True, append_images=frames[1:],
                 duration=int(1000 * seconds_per_frame), loop=0)


# ---------------------------------------------------------------------------------------------
# Modes.


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


def generate(model: inference.TrainedModel, num: int, seed: int, temperature: float = 1.0, *,
             condition: np.ndarray | None = None, batch_size: int = 16, min_size: int = 3
             ) -> tuple[np.ndarray, dict[str, np.ndarray], list[reconstruction.Reconstruction]]:
  """Random draws: latents, decoded grids and their crystals (or reasons)."""
  z = random_latents(num, model.config.model.latent_dim, seed, temperature)
  grids = decode_in_batches(model, z, condition, batch_size)
  return z, grids, to_crystals(model, grids, min_size)


def sample(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
           out_dir: pathlib.Path) -> dict:
  """`--mode=sample`: random draws from the prior; see the module docstring."""
  train_crystals = training_crystals(model.config, settings.num_train_structures, settings.seed)
  condition = draw_conditions(model, settings.num, settings.seed, train_crystals)
  _, grids, rebuilt = generate(model, settings.num, settings.seed, settings.temperature,
                               condition=condition, batch_size=settings.batch_size,
                               min_size=model.config.eval.min_component_size)
  ids = [f"sample_{index:04d}" for index in range(settings.num)]
  counts = write_cifs(rebuilt, ids, out_dir / "cifs")
  reference = [crystal.to_structure() for crystal in train_crystals]
  results = {"seed": settings.seed, "temperature": settings.temperature, **counts,
             **sample_summary(rebuilt, reference), "num_train_structures": len(reference)}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sample_distances = np.concatenate(
        [nearest_neighbour_distances(r.structure) for r in rebuilt if r.valid] or [np.zeros(0)])
    train_distances = np.concatenate([nearest_neighbour_distances(s) for s in reference])
  results["nearest_neighbour_median_samples"] = (float(np.median(sample_distances))
                                                 if sample_distances.size else float("nan"))
  results["nearest_neighbour_median_train"] = float(np.median(train_distances))
  shown = min(settings.gallery, settings.num)
  plot_gallery({key: value[:shown] for key, value in grids.items()}, rebuilt[:shown], model.spec,
               out_dir / "gallery.png")
  plot_nearest_neighbours(sample_distances, train_distances, out_dir / "nearest_neighbours.png")
  write_json(out_dir / "summary.json", results)
  logging.info("wrote %s: %s", out_dir, results)
  print(f"{settings.num} samples written to {out_dir}")
  for key in ("valid_fraction", "composition_valid_fraction", "wasserstein_density",
              "wasserstein_num_elements"):
    print(f"  {key}: {results[key]:.4f}")
  return results


def encode_crystals(model: inference.TrainedModel, structures: Sequence[crystals.Crystal],
                    batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
  """Latent means of crystals voxelised as at evaluation, and their conditions (or None); in
  batches of at most `batch_size`."""
  means, conditions = [], []
  for begin in range(0, len(structures), batch_size):
    grids = model.voxelize(structures[begin:begin + batch_size])
    condition = model.condition(grids["density"])
    means.append(model.encode(grids["density"], condition, grids["composition"])[0])
    conditions.append(None if condition is None else np.asarray(condition))
  if conditions[0] is None:
    return np.concatenate(means), None
  return np.concatenate(means), np.concatenate(conditions)


def interpolation(model: inference.TrainedModel, start: crystals.Crystal, end: crystals.Crystal,
                  steps: int, min_size: int = 3
                  ) -> dict[str, tuple[dict[str, np.ndarray], list[reconstruction.Reconstruction]]]:
  """Per method: the decoded grids along the path between the two crystals' latent means and
  the crystals rebuilt from them."""
  means, condition = encode_crystals(model, [start, end])
  path_condition = None
  if condition is not None:
    path_condition = np.linspace(condition[0], condition[1], steps).astype(np.float32)
  results = {}
  for method in METHODS:
    z = interpolate_latents(means[0], means[1], steps, method)
    grids = decode_in_batches(model, z, path_condition, batch_size=steps)
    results[method] = (grids, to_crystals(model, grids, min_size))
  return results


def interpolate(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
                out_dir: pathlib.Path) -> dict:
  """`--mode=interpolate`: see the module docstring."""
  start = load_crystal(settings.start, model.config, 0)
  end = load_crystal(settings.end, model.config, 1)
  paths = interpolation(model, start, end, settings.steps, model.config.eval.min_component_size)
  results = {"start": start.id, "end": end.id, "steps": settings.steps}
  for method, (_, rebuilt) in paths.items():
    ids = [f"step_{step:02d}" for step in range(settings.steps)]
    results[method] = {**write_cifs(rebuilt, ids, out_dir / method / "cifs"),
                       "formulas": [_label(r) for r in rebuilt]}
  titles = [f"t = {t:.2f}" for t in np.linspace(0.0, 1.0, settings.steps)]
  grids = {method: grids for method, (grids, _) in paths.items()}
  title = f"{start.id} → {end.id}"
  plot_path(grids, titles, model.spec, out_dir / "panel.png", title)
  write_gif(grids, [f"{title}, {t}" for t in titles], model.spec, out_dir / "interpolation.gif",
            settings.seconds_per_frame)
  write_json(out_dir / "summary.json", results)
  print(f"Interpolation {title} ({settings.steps} steps) written to {out_dir}")
  for method in METHODS:
    print(f"  {method}: {' | '.join(results[method]['formulas'])}")
  return results


def traverse(model: inference.TrainedModel, settings: ml_collections.ConfigDict,
             out_dir: pathlib.Path) -> dict:
  """`--mode=traverse`: see the module docstring."""
  crystal = load_crystal(settings.crystal, model.config, 0)
  means, condition = encode_crystals(model, [crystal])
  values = np.linspace(settings.low, settings.high, settings.steps)
  z = traverse_latents(means[0], settings.dim, values)
  path_condition = None if condition is None else np.repeat(condition, settings.steps)
  grids = decode_in_batches(model, z, path_condition, batch_size=settings.steps)
  rebuilt = to_crystals(model, grids, model.config.eval.min_component_size)
  out_dir.mkdir(parents=True, exist_ok=True)
  titles = [f"z[{settings.dim}] = {v:+.1f}" for v in values]
  plot_path({crystal.id: grids}, titles, model.spec, out_dir / "traverse.png",
            f"{crystal.id}: latent {settings.dim} (encoded {means[0, settings.dim]:+.2f})")
  density = grids["density"].reshape(settings.steps, -1)
  results = {"crystal": crystal.id, "dim": settings.dim,
             "encoded_value": float(means[0, settings.dim]),
             "values": values.tolist(), "max_density": density.max(axis=1).tolist(),
             "mean_abs_change_from_first": np.abs(density - density[:1]).mean(axis=1).tolist(),
             "formulas": [_label(r) for r in rebuilt]}
  write_json(out_dir / "summary.json", results)
  print(f"Traversal of latent {settings.dim} for {crystal.id} written to {out_dir}")
  return results
