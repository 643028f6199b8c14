"""Figures: slices in Å with a colour bar and species legend; empty plots say why."""

import numpy as np
import pytest
from PIL import Image
from pymatgen.core import Lattice
from pymatgen.core import Structure

from crystal_vae import metrics
from crystal_vae import plots
from crystal_vae import voxelize
from crystal_vae.segmentation import Atoms

SPEC = voxelize.GridSpec(grid=8, box=4.0)


def _atoms(species, positions) -> Atoms:
  species = np.asarray(species, np.int32)
  return Atoms(species=species, positions=np.asarray(positions, np.float64).reshape(-1, 3),
               voxels=np.ones(species.shape[0], np.int64),
               on_boundary=np.zeros(species.shape[0], bool))


def _texts(axis) -> list[str]:
  return [text.get_text() for text in axis.texts]


@pytest.fixture(name="drawn")
def _drawn(monkeypatch):
  """Takes the figures the plotting functions drew since the last call (kept open after they
  are saved)."""
  plt = plots.pyplot()
  close = plt.close
  close("all")
  monkeypatch.setattr(plt, "close", lambda *args: None)

  def take():
    figures = [plt.figure(number) for number in plt.get_fignums()]
    close("all")
    return figures

  yield take
  close("all")


def _pixels(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"), np.float64)


def test_a_slice_is_drawn_in_angstrom_with_its_species():
  density = np.zeros((8, 8, 8), np.float32)
  density[2, 3, 4] = 2.0
  species = np.zeros((8, 8, 8), np.int32)
  species[2, 3, 4], species[5, 5, 4], species[1, 1, 0] = 8, 26, 11  # Na is in another slice
  colours = plots.species_colours(species)
  assert sorted(colours) == [8, 11, 26] and len(set(colours.values())) == 3
  plt = plots.pyplot()
  figure, axis = plt.subplots()
  shown, image = plots.draw_slice(axis, density, species, SPEC, colours)
  assert shown == {8, 26}  # the slice with the most atom voxels: z index 4, not Na's 0
  assert list(axis.get_xticks()) == [0.0, 2.0, 4.0] and axis.get_xlabel() == "x (Å)"
  assert image.get_extent() == [0.0, 4.0, 0.0, 4.0] and image.get_clim() == (0.0, 2.0)
  assert _texts(axis) == ["z = 2.25 Å"]  # (4 + 0.5) × 0.5 Å
  _, empty_axis = plt.subplots()
  plots.draw_slice(empty_axis, density, np.zeros_like(species), SPEC, colours)
  assert _texts(empty_axis) == ["z = 2.25 Å", "no atoms"]  # the densest slice
  plt.close("all")


def test_a_slice_is_drawn_dark_where_dense_and_in_its_species_colour():
  """The pixels of a slice filling its figure (50 × 50 pixels a voxel): the gray_r density is
  black at the maximum, mid-grey at half, white at zero; a species voxel is its colour at 55%
  over white."""
  density = np.zeros((8, 8, 8), np.float32)
  density[2, 3, 4], density[1, 1, 4] = 2.0, 1.0
  species = np.zeros((8, 8, 8), np.int32)
  species[5, 5, 4] = 26
  colours = {26: (1.0, 0.0, 0.0)}
  plt = plots.pyplot()
  figure = plt.figure(figsize=(4, 4), dpi=100)
  axis = figure.add_axes((0, 0, 1, 1))
  plots.draw_slice(axis, density, species, SPEC, colours, index=4)
  figure.canvas.draw()
  pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(np.float64)
  plt.close(figure)

  def at(x: int, y: int) -> np.ndarray:  # the centre of voxel (x, y); y grows upwards
    return pixels[400 - (50 * y + 25), 50 * x + 25]

  np.testing.assert_allclose(at(2, 3), [0, 0, 0], atol=2)
  np.testing.assert_allclose(at(1, 1), [127.5] * 3, atol=2)
  np.testing.assert_allclose(at(6, 1), [255] * 3, atol=2)
  np.testing.assert_allclose(at(5, 5), [255, 0.45 * 255, 0.45 * 255], atol=2)


def test_gallery_panels_show_each_samples_slice_on_one_scale(tmp_path, drawn):
  rng = np.random.default_rng(0)
  density = rng.random((3, 8, 8, 8)).astype(np.float32)
  species = np.zeros((3, 8, 8, 8), np.int32)
  species[0, 4, 4, 6] = 14
  plots.plot_gallery({"density": density, "species": species}, ["Si", "(no_atoms)", "x"], SPEC,
                     tmp_path / "g.png", "random samples")
  (figure,) = drawn()
  panels = [axis for axis in figure.axes if axis.get_title()]
  assert [axis.get_title() for axis in panels] == ["0: Si", "1: (no_atoms)", "2: x"]
  # Sample 0: the slice of its atom; the others: their densest slice, and they say "no atoms".
  slices = [6, *(int(np.argmax(d.sum(axis=(0, 1)))) for d in density[1:])]
  for axis, sample, k in zip(panels, density, slices):
    np.testing.assert_array_equal(axis.images[0].get_array(), sample[:, :, k].T)
    assert axis.images[0].get_clim() == (0.0, density.max())
  assert "no atoms" not in _texts(panels[0])
  assert all("no atoms" in _texts(axis) for axis in panels[1:])
  width, height = figure.get_size_inches() * 90  # saved at 90 dpi
  assert _pixels(tmp_path / "g.png").shape == (round(height), round(width), 3)


def test_path_panels_show_each_rows_steps(tmp_path, drawn):
  density = np.zeros((2, 8, 8, 8), np.float32)
  density[0, 1, 1, 2], density[1, 6, 6, 5] = 1.0, 3.0
  species = np.zeros_like(density, np.int32)
  plots.plot_path({"linear": {"density": density, "species": species},
                   "slerp": {"density": 2 * density, "species": species}}, ["a", "b"], SPEC,
                  tmp_path / "p.png", "a → b")
  (figure,) = drawn()
  panels = [axis for axis in figure.axes if axis.get_title()]
  assert [axis.get_title() for axis in panels] == ["a", "b", "a", "b"]
  for axis, (scale, step, k) in zip(panels, [(1, 0, 2), (1, 1, 5), (2, 0, 2), (2, 1, 5)]):
    np.testing.assert_array_equal(axis.images[0].get_array(), scale * density[step][:, :, k].T)
    assert axis.images[0].get_clim() == (0.0, 6.0)  # one scale: the densest of both rows


def test_evaluation_figures_draw_the_comparisons_and_say_when_there_is_nothing(tmp_path, drawn):
  true = _atoms([8, 22], [[1, 1, 1], [5, 5, 5]])
  comparisons = [metrics.compare_atoms(_atoms([8], [[1.2, 1, 1]]), true),
                 metrics.compare_atoms(_atoms([], []), true)]
  paths = plots.save_evaluation_figures(tmp_path / "some", comparisons, mse=np.array([0.2, 0.1]))
  assert [p.name for p in paths] == ["voxel_errors.png", "atom_counts.png", "distances.png",
                                     "species.png"]
  figures = drawn()
  errors, counts, distances, species = (figure.axes[0] for figure in figures)
  np.testing.assert_allclose(errors.lines[0].get_xydata(), [[50, 0.1], [100, 0.2]])
  # (true, predicted) atom counts: (2, 1) and (2, 0); Z: one O for one O.
  np.testing.assert_array_equal(counts.collections[0].get_offsets(), [[2, 0], [2, 1]])
  np.testing.assert_array_equal(species.collections[0].get_offsets(), [[8, 8]])
  # true → predicted: O 0.2 Å, Ti (3.8, 4, 4) Å away (and the second sample's two at inf, not
  # drawn); predicted → true: the O 0.2 Å.
  np.testing.assert_allclose(distances.lines[0].get_xydata(),
                             [[25, 0.2], [50, np.sqrt(3.8**2 + 32)]])
  np.testing.assert_allclose(distances.lines[1].get_xydata(), [[100, 0.2]])
  assert not any(_texts(figure.axes[0]) for figure in figures)
  nothing = plots.save_evaluation_figures(tmp_path / "none", [])
  said = [_texts(figure.axes[0]) for figure in drawn()]
  assert said == [["no samples"], ["no atoms decoded (or none true): no distances"],
                  ["no decoded atom within 0.5 Å of a true atom"]]
  for path in nothing:
    assert np.ptp(_pixels(path)) > 0  # not a blank image


def test_rebuilt_crystals_are_drawn_beside_the_true_ones_or_said_missing(tmp_path, drawn):
  rock_salt = Structure(Lattice.cubic(2.82), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
  cscl = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
  plots.plot_rebuilt_crystals([rock_salt, cscl], [rock_salt, None],
                              ["a: NaCl, matches", "b: no crystal (no_lattice)"],
                              tmp_path / "r.png")
  (figure,) = drawn()
  true_a, rebuilt_a, true_b, rebuilt_b = figure.axes  # column by column
  assert [true_a.get_title(), true_b.get_title()] == ["true NaCl", "true CsCl"]
  assert rebuilt_b.get_title() == "b\nno crystal (no_lattice)" and "no crystal" in _texts(rebuilt_b)
  assert not _texts(rebuilt_a) and len(rebuilt_a.collections[0].get_offsets()) == 2
  assert [text.get_text() for text in figure.legends[0].get_texts()] == ["Na", "Cl", "Cs"]
