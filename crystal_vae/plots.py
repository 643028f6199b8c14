"""Figures (matplotlib on Agg, written as PNG or GIF) for every mode.

Density slices are drawn in Å with a colour bar of the density (Z-weighted Gaussians, Z/Å³) and
a legend naming each species' colour; a panel or plot with nothing to show says so in words.
"""

from __future__ import annotations

import io
import math
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pymatgen.core import Element

if TYPE_CHECKING:
  from crystal_vae.metrics import AtomComparison

Colours = dict[int, tuple[float, float, float]]


class Grid(Protocol):
  """What a figure needs of a grid (`voxelize.GridSpec`): its size, box and voxel centres."""

  grid: int
  box: float

  def voxel_centres(self) -> np.ndarray:
    ...

DENSITY_LABEL = "density (Z / Å³)"


def pyplot():
  """matplotlib.pyplot on the Agg backend."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def species_colours(*species_grids: np.ndarray) -> Colours:
  """One colour per species present in any of the grids (tab20 by rank of Z, cycling)."""
  present = sorted(set().union(*[{int(z) for z in np.unique(g)} for g in species_grids]) - {0})
  palette = pyplot().get_cmap("tab20")
  return {z: palette(rank % 20)[:3] for rank, z in enumerate(present)}


def _say(axis, text: str) -> None:
  """Writes `text` in the middle of an axis (a panel or plot with nothing to show)."""
  # A 3-D axis places text in data coordinates; its `text2D` takes the axes' own.
  write = getattr(axis, "text2D", axis.text)
  write(0.5, 0.5, text, transform=axis.transAxes, ha="center", va="center", fontsize=8,
        color="0.2", wrap=True, bbox=dict(facecolor="white", alpha=0.8, lw=0))


def draw_slice(axis, density: np.ndarray, species: np.ndarray, spec: Grid, colours: Colours,
               index: int | None = None, vmax: float | None = None, axis_labels: bool = True):
  """Draws z-slice `index` of a density grid in Å with its non-zero species voxels overlaid in
  their `colours`, its height written in a corner (default: the slice with the most atom voxels,
  else the densest). Returns (species shown, the density image for a colour bar). A grid
  without atom voxels says "no atoms"."""
  k = best_slice(density, species) if index is None else index
  extent = (0.0, spec.box, 0.0, spec.box)
  image = axis.imshow(density[:, :, k].T, origin="lower", extent=extent, cmap="gray_r",
                      vmin=0.0, vmax=vmax or float(density.max()) or 1.0)
  shown = {int(z) for z in np.unique(species[:, :, k]) if z > 0}
  overlay = np.zeros(species.shape[:2] + (4,))
  for z in shown:
    overlay[species[:, :, k] == z] = (*colours[z], 0.55)
  axis.imshow(overlay.transpose(1, 0, 2), origin="lower", extent=extent)
  ticks = [0.0, spec.box / 2, spec.box]
  axis.set_xticks(ticks)
  axis.set_yticks(ticks)
  axis.tick_params(labelsize=6)
  if axis_labels:
    axis.set_xlabel("x (Å)", fontsize=7)
    axis.set_ylabel("y (Å)", fontsize=7)
  axis.text(0.03, 0.97, f"z = {spec.voxel_centres()[k]:.2f} Å", transform=axis.transAxes,
            ha="left", va="top", fontsize=6, bbox=dict(facecolor="white", alpha=0.7, lw=0))
  if not species.any():
    _say(axis, "no atoms")
  return shown, image


def best_slice(density: np.ndarray, species: np.ndarray) -> int:
  """The z index with the most atom voxels (ties: the densest), the densest without atoms."""
  atoms = (species > 0).sum(axis=(0, 1))
  return int(np.lexsort((-density.sum(axis=(0, 1)), -atoms))[0])


def add_species_legend(figure, colours: Colours, shown: set[int]) -> None:
  """A figure legend naming the overlay colour of each species shown, right of the panels (and
  of their colour bar) in a figure with the constrained layout."""
  from matplotlib import patches  # pylint: disable=import-outside-toplevel
  handles = [patches.Patch(color=colours[z], label=Element.from_Z(z).symbol)
             for z in sorted(shown)]
  if handles:
    figure.legend(handles=handles, loc="outside right upper", fontsize=7, title="species",
                  title_fontsize=7, ncol=1 + len(handles) // 20)


def _finish(figure, image, axes, shown: set[int], colours: Colours, path: pathlib.Path,
            dpi: int = 90) -> None:
  """Colour bar beside `axes`, species legend on the right, saved to `path` and closed."""
  figure.colorbar(image, ax=axes, label=DENSITY_LABEL, shrink=0.8, pad=0.02)
  add_species_legend(figure, colours, shown)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=dpi)
  pyplot().close(figure)


def plot_slices(density: np.ndarray, species: np.ndarray, spec: Grid, path: pathlib.Path,
                title: str, num_slices: int = 4) -> None:
  """`num_slices` z-slices of one grid: those holding the most density, at least
  grid / (2 num_slices) voxels apart."""
  plt = pyplot()
  colours = species_colours(species)
  gap = max(1, spec.grid // (2 * num_slices))
  slices = []
  for k in np.argsort(-density.sum(axis=(0, 1)), kind="stable"):
    if len(slices) < num_slices and all(abs(k - other) >= gap for other in slices):
      slices.append(int(k))
  figure, axes = plt.subplots(1, num_slices, figsize=(3.6 * num_slices + 1.5, 4.0),
                              squeeze=False, layout="constrained")
  shown, vmax = set(), float(density.max()) or 1.0
  for axis, k in zip(axes[0], sorted(slices)):
    drawn, image = draw_slice(axis, density, species, spec, colours, index=k, vmax=vmax)
    shown |= drawn
    axis.set_title(f"z = {spec.voxel_centres()[k]:.2f} Å", fontsize=9)
  figure.suptitle(title)
  _finish(figure, image, axes, shown, colours, path, dpi=100)


def plot_gallery(grids: dict[str, np.ndarray], labels: Sequence[str], spec: Grid,
                 path: pathlib.Path, title: str, columns: int = 4) -> None:
  """A grid of panels: the middle z-slice of each grid, titled by its label."""
  plt = pyplot()
  num = grids["density"].shape[0]
  columns = max(min(columns, num), 1)
  rows = max(math.ceil(num / columns), 1)
  figure, axes = plt.subplots(rows, columns, figsize=(2.5 * columns + 1.8, 2.7 * rows + 0.4),
                              squeeze=False, layout="constrained")
  colours, shown = species_colours(grids["species"]), set()
  vmax = float(grids["density"].max()) or 1.0
  image = None
  for index, axis in enumerate(axes.ravel()):
    if index < num:
      drawn, image = draw_slice(axis, grids["density"][index], grids["species"][index], spec,
                                colours, vmax=vmax, axis_labels=index % columns == 0)
      shown |= drawn
      axis.set_title(f"{index}: {labels[index]}", fontsize=8)
    else:
      axis.axis("off")
  figure.suptitle(title)
  _finish(figure, image, axes, shown, colours, path)


def plot_path(grids_by_row: dict[str, dict[str, np.ndarray]], column_titles: Sequence[str],
              spec: Grid, path: pathlib.Path, title: str) -> None:
  """Rows of middle z-slices (one row per path, one column per step), one colour scale."""
  plt = pyplot()
  rows, columns = len(grids_by_row), len(column_titles)
  vmax = max(float(g["density"].max()) for g in grids_by_row.values()) or 1.0
  figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns + 1.8, 2.2 * rows + 0.5),
                              squeeze=False, layout="constrained")
  colours = species_colours(*[g["species"] for g in grids_by_row.values()])
  shown = set()
  for row, (name, grids) in enumerate(grids_by_row.items()):
    for column in range(columns):
      axis = axes[row, column]
      drawn, image = draw_slice(axis, grids["density"][column], grids["species"][column], spec,
                                colours, vmax=vmax, axis_labels=column == 0)
      shown |= drawn
      axis.set_title(column_titles[column], fontsize=8)
    axes[row, 0].set_ylabel(f"{name}\ny (Å)", fontsize=8)
  figure.suptitle(title)
  _finish(figure, image, axes, shown, colours, path)


def _figure_image(figure) -> np.ndarray:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=80)
  buffer.seek(0)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return np.asarray(Image.open(buffer).convert("RGB"))


def write_gif(grids_by_row: dict[str, dict[str, np.ndarray]], frame_titles: Sequence[str],
              spec: Grid, path: pathlib.Path, seconds_per_frame: float) -> None:
  """An animated GIF: one frame per step showing each path's middle slice side by side."""
  plt = pyplot()
  from PIL import Image  # pylint: disable=import-outside-toplevel
  vmax = max(float(g["density"].max()) for g in grids_by_row.values()) or 1.0
  colours = species_colours(*[g["species"] for g in grids_by_row.values()])
  frames = []
  for step, frame_title in enumerate(frame_titles):
    figure, axes = plt.subplots(1, len(grids_by_row), figsize=(3.0 * len(grids_by_row) + 1.8,
                                                               3.4),
                                squeeze=False, layout="constrained")
    shown = set()
    for axis, (name, grids) in zip(axes[0], grids_by_row.items()):
      drawn, image = draw_slice(axis, grids["density"][step], grids["species"][step], spec,
                                colours, vmax=vmax)
      shown |= drawn
      axis.set_title(name, fontsize=9)
    figure.suptitle(frame_title, fontsize=9)
    figure.colorbar(image, ax=axes, label=DENSITY_LABEL, shrink=0.8, pad=0.02)
    add_species_legend(figure, colours, shown)
    frames.append(Image.fromarray(_figure_image(figure)))
    plt.close(figure)
  frames[0].save(path, save_all=True, append_images=frames[1:],
                 duration=int(1000 * seconds_per_frame), loop=0)


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
    axis.hist(finite[0], bins=bins, density=True, alpha=0.5,
              label=f"samples ({finite[0].size})")
  else:
    _say(axis, "no valid sample: no sample distances to show")
  axis.set_xlabel("nearest-neighbour distance (Å)")
  axis.set_ylabel("density")
  axis.legend(fontsize=8)
  _save(figure, path)


def _save(figure, path: pathlib.Path, dpi: int = 100) -> None:
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=dpi)
  pyplot().close(figure)


# Evaluation: the panels of the paper's Fig. 3/4.


def _percentile_curve(axis, values: np.ndarray, label: str) -> bool:
  """Sorted finite values against their percentile; False when there are none."""
  finite = np.sort(values[np.isfinite(values)])
  if finite.size:
    axis.plot(100.0 * np.arange(1, finite.size + 1) / values.size, finite, label=label)
  return bool(finite.size)


def plot_voxel_errors(mse: np.ndarray, path: pathlib.Path) -> None:
  """Per-sample voxel MSE against its percentile (Fig. 3a/4a)."""
  plt = pyplot()
  figure, axis = plt.subplots(figsize=(4.5, 3.5))
  if _percentile_curve(axis, np.asarray(mse, np.float64), "voxel MSE"):
    axis.set_yscale("log")
  else:
    _say(axis, "no samples")
  axis.set_xlabel("percentile of samples")
  axis.set_ylabel("voxel MSE")
  _save(figure, path)


def _parity(points: np.ndarray, path: pathlib.Path, xlabel: str, ylabel: str, empty: str) -> None:
  """(x, y) integer pairs as a scatter, point size = how many, with the identity dashed."""
  plt = pyplot()
  unique, multiplicity = np.unique(points, axis=0, return_counts=True)
  figure, axis = plt.subplots(figsize=(4.5, 4))
  if unique.size:
    axis.scatter(unique[:, 0], unique[:, 1], s=10 + 40 * multiplicity / multiplicity.max(),
                 alpha=0.7)
  else:
    _say(axis, empty)
  top = max(int(points.max()) if points.size else 1, 1)
  axis.plot([0, top], [0, top], "k--", linewidth=0.8)
  axis.set_xlabel(xlabel)
  axis.set_ylabel(ylabel)
  _save(figure, path)


def plot_atom_counts(comparisons: Sequence[AtomComparison], path: pathlib.Path) -> None:
  """Predicted vs true atom counts per sample (Fig. 3b/4b)."""
  counts = np.array([(c.true_count, c.predicted_count) for c in comparisons]).reshape(-1, 2)
  _parity(counts, path, "true atoms in cube", "predicted atoms in cube", "no samples")


def plot_distances(comparisons: Sequence[AtomComparison], path: pathlib.Path) -> None:
  """Nearest-atom distance against its percentile, true -> predicted and predicted -> true
  (Fig. 3c/4c)."""
  plt = pyplot()
  figure, axis = plt.subplots(figsize=(4.5, 3.5))
  drawn = False
  for name, label in (("true_to_predicted", "true → predicted"),
                      ("predicted_to_true", "predicted → true")):
    pooled = np.concatenate([getattr(c, name) for c in comparisons]) if comparisons else np.zeros(0)
    drawn |= _percentile_curve(axis, pooled, label)
  if drawn:
    axis.legend(fontsize=8)
  else:
    _say(axis, "no atoms decoded (or none true): no distances")
  axis.set_xlabel("percentile of atoms")
  axis.set_ylabel("nearest-atom distance (Å)")
  _save(figure, path)


def plot_species(comparisons: Sequence[AtomComparison], path: pathlib.Path) -> None:
  """Predicted vs true Z of predicted atoms within 0.5 Å of a true atom (Fig. 3d/4d)."""
  pairs = (np.concatenate([c.species_pairs for c in comparisons]) if comparisons
           else np.zeros((0, 2), np.int64))  # (predicted, true)
  _parity(pairs[:, ::-1], path, "true Z", "predicted Z",
          "no decoded atom within 0.5 Å of a true atom")


def save_evaluation_figures(directory: pathlib.Path, comparisons: Sequence[AtomComparison],
                            mse: np.ndarray | None = None) -> list[pathlib.Path]:
  """Writes every evaluation panel as a PNG into `directory`; returns the paths."""
  panels = [("atom_counts.png", plot_atom_counts), ("distances.png", plot_distances),
            ("species.png", plot_species)]
  paths = []
  if mse is not None:
    paths.append(directory / "voxel_errors.png")
    plot_voxel_errors(mse, paths[-1])
  for name, plot in panels:
    paths.append(directory / name)
    plot(comparisons, paths[-1])
  return paths


# Mode reports.


def plot_property_parity(predicted: np.ndarray, true: np.ndarray, names: Sequence[str],
                         scores: dict[str, dict[str, float]], path: pathlib.Path) -> None:
  """Predicted against true value of each property (one panel each), with MAE and R² beside
  those of predicting the training mean."""
  plt = pyplot()
  figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
  for column, (axis, name) in enumerate(zip(axes[0], names)):
    known = np.isfinite(true[:, column])
    x, y = true[known, column], predicted[known, column]
    if x.size:
      axis.scatter(x, y, s=6, alpha=0.5)
      low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
      axis.plot([low, high], [low, high], "k--", linewidth=0.8)
      score = scores[name]
      axis.set_title(f"{name}: MAE {score['mae']:.3g}, R² {score['r2']:.2f}\n"
                     f"(training mean: MAE {score['baseline_mae']:.3g})", fontsize=9)
    else:
      _say(axis, f"no crystal with a value of {name}")
    axis.set_xlabel(f"true {name}")
    axis.set_ylabel(f"predicted {name}")
  _save(figure, path)


def plot_optimisation(predictions: np.ndarray, saved_steps: Sequence[int], judged: np.ndarray,
                      valid: np.ndarray, training_values: np.ndarray, name: str,
                      path: pathlib.Path) -> None:
  """The optimised head's prediction along each latent path (steps + 1, N), the judged values of
  the valid crystals rebuilt at the saved steps (K, N), and the training split's 5/50/95th
  percentiles."""
  plt = pyplot()
  figure, axis = plt.subplots(figsize=(6.5, 4))
  steps = np.arange(predictions.shape[0])
  axis.plot(steps, predictions, color="tab:blue", linewidth=0.8, alpha=0.6)
  axis.plot([], [], color="tab:blue", label="head prediction (each start)")
  x = np.repeat(np.asarray(saved_steps)[:, None], judged.shape[1], axis=1)
  shown = valid & np.isfinite(judged)
  if shown.any():
    axis.scatter(x[shown], judged[shown], s=14, color="tab:red", zorder=3,
                 label="judged value of a valid rebuilt crystal")
  else:
    _say(axis, "no valid crystal rebuilt at the saved steps")
  if training_values.size:
    for percent, style in ((5, ":"), (50, "--"), (95, ":")):
      axis.axhline(np.percentile(training_values, percent), color="k", linestyle=style,
                   linewidth=0.8, label=f"training {percent}th percentile")
  axis.set_xlabel("optimisation step")
  axis.set_ylabel(name)
  axis.legend(fontsize=7, loc="best")
  _save(figure, path)


def plot_screening(reread: np.ndarray, judged: np.ndarray, training_values: np.ndarray,
                   name: str, path: pathlib.Path) -> None:
  """The kept crystals of a screening: the optimised model's own reading of each rebuilt crystal
  against the judge's, over the training split's 5/10/15th and 50th percentiles."""
  plt = pyplot()
  figure, axis = plt.subplots(figsize=(5, 4.5))
  shown = np.isfinite(reread) & np.isfinite(judged)
  if shown.any():
    axis.scatter(reread[shown], judged[shown], s=14, color="tab:red", zorder=3,
                 label="a kept crystal")
    low = float(min(reread[shown].min(), judged[shown].min()))
    high = float(max(reread[shown].max(), judged[shown].max()))
    axis.plot([low, high], [low, high], "k--", linewidth=0.8, label="judge = model")
  else:
    _say(axis, "no crystal kept")
  if training_values.size:
    for percent, style in ((5, ":"), (10, "-."), (15, ":"), (50, "--")):
      axis.axhline(np.percentile(training_values, percent), color="tab:grey", linestyle=style,
                   linewidth=0.8, label=f"training {percent}th percentile")
  axis.set_xlabel(f"{name}: the optimised model's reading of the rebuilt crystal")
  axis.set_ylabel(f"{name}: the judge's reading")
  axis.legend(fontsize=7, loc="best")
  _save(figure, path)


def plot_conditional(targets: np.ndarray, maxima: np.ndarray,
                     decoded: list[dict[str, np.ndarray]], spec: Grid,
                     path: pathlib.Path) -> None:
  """Left: generated maximum vs target (mean ± std, identity dashed); right: sample 0's middle
  slice at each target on one colour scale."""
  plt = pyplot()
  columns = len(targets)
  figure = plt.figure(figsize=(5.0 + 2.0 * columns, 3.6), layout="constrained")
  grid = figure.add_gridspec(1, columns + 2)
  axis = figure.add_subplot(grid[0, :2])
  axis.errorbar(targets, maxima.mean(axis=1), yerr=maxima.std(axis=1), fmt="o-", capsize=3)
  top = float(max(targets.max(), maxima.max()))
  axis.plot([0, top], [0, top], "k--", linewidth=0.8)
  axis.set_xlabel(f"target maximum {DENSITY_LABEL}")
  axis.set_ylabel("generated maximum")
  vmax = max(float(g["density"][0].max()) for g in decoded) or 1.0
  colours, shown = species_colours(*[g["species"][0] for g in decoded]), set()
  slice_axes = []
  for column, (target, grids) in enumerate(zip(targets, decoded)):
    slice_axes.append(figure.add_subplot(grid[0, column + 2]))
    drawn, image = draw_slice(slice_axes[-1], grids["density"][0], grids["species"][0], spec,
                              colours, vmax=vmax, axis_labels=column == 0)
    shown |= drawn
    slice_axes[-1].set_title(f"target {target:.2f}", fontsize=8)
  _finish(figure, image, slice_axes, shown, colours, path)


def plot_discriminator_scores(scores: dict[str, np.ndarray], losses: np.ndarray,
                              path: pathlib.Path) -> None:
  """Training loss per step and histograms of the scores of each group."""
  plt = pyplot()
  figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
  loss_axis.plot(np.arange(1, losses.size + 1), losses, linewidth=0.8)
  loss_axis.set_xlabel("step")
  loss_axis.set_ylabel("loss")
  bins = np.linspace(0.0, 1.0, 26)
  for name, values in scores.items():
    score_axis.hist(values, bins=bins, alpha=0.5, label=name)
  score_axis.set_xlabel("discriminator output (0 real, 1 random)")
  score_axis.legend(fontsize=8)
  _save(figure, path)


# Crystals as atoms: true against rebuilt.


def _draw_cell(axis, structure, colours: Colours) -> None:
  """One cell of `structure` in 3-D: its edges and its atoms (size by Z, colour by species)."""
  matrix = structure.lattice.matrix
  corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
  for a in range(8):
    for b in range(a + 1, 8):
      if np.abs(corners[a] - corners[b]).sum() == 1:  # an edge of the parallelepiped
        segment = corners[[a, b]] @ matrix
        axis.plot(*segment.T, color="0.6", lw=0.6)
  positions = np.mod(structure.frac_coords, 1.0) @ matrix
  numbers = np.array(structure.atomic_numbers)
  axis.scatter(*positions.T, s=20 + 2.5 * numbers, c=[colours[z] for z in numbers],
               edgecolors="k", linewidths=0.4, depthshade=False)
  axis.set_box_aspect(np.ptp(np.vstack([positions, corners @ matrix]), axis=0) + 1e-3)
  axis.set_axis_off()


def plot_rebuilt_crystals(true: Sequence, rebuilt: Sequence, captions: Sequence[str],
                          path: pathlib.Path) -> None:
  """True crystals (top row) above the crystals rebuilt from their decoded grids (bottom row;
  None = no crystal), one column each, captioned, species named in a legend."""
  plt = pyplot()
  count = len(true)
  figure = plt.figure(figsize=(2.4 * max(count, 1), 5.4))
  if not count:
    _say(figure.add_subplot(1, 1, 1), "no crystals to show")
    _save(figure, path)
    return
  present = {z for s in [*true, *rebuilt] if s is not None for z in s.atomic_numbers}
  palette = plt.get_cmap("tab20")
  colours = {z: palette(rank % 20)[:3] for rank, z in enumerate(sorted(present))}
  for column, (structure, result, caption) in enumerate(zip(true, rebuilt, captions)):
    top = figure.add_subplot(2, count, column + 1, projection="3d")
    _draw_cell(top, structure, colours)
    top.set_title(f"true {structure.composition.reduced_formula}", fontsize=8)
    bottom = figure.add_subplot(2, count, count + column + 1, projection="3d")
    if result is None:
      bottom.set_axis_off()
      _say(bottom, "no crystal")
    else:
      _draw_cell(bottom, result, colours)
    bottom.set_title("\n".join(caption.split(": ", 1)), fontsize=7)
  handles = [plt.Line2D([], [], marker="o", ls="", color=colours[z], markeredgecolor="k",
                        label=Element.from_Z(int(z)).symbol) for z in sorted(present)]
  figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 12), fontsize=7,
                frameon=False)
  figure.suptitle("true crystals (top) and the crystals rebuilt from their decoded densities "
                  "(bottom)", fontsize=9)
  figure.subplots_adjust(bottom=0.1)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=100)
  plt.close(figure)
