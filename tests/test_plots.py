"""Figures: slices in Å with a colour bar and species legend; empty plots say why."""

import numpy as np

from crystal_vae import metrics
from crystal_vae import plots
from crystal_vae import voxelize
from crystal_vae.segmentation import Atoms

PNG = b"\x89PNG\r\n\x1a\n"
SPEC = voxelize.GridSpec(grid=8, box=4.0)


def _atoms(species, positions) -> Atoms:
  species = np.asarray(species, np.int32)
  return Atoms(species=species, positions=np.asarray(positions, np.float64).reshape(-1, 3),
               voxels=np.ones(species.shape[0], np.int64),
               on_boundary=np.zeros(species.shape[0], bool))


def _texts(axis) -> list[str]:
  return [text.get_text() for text in axis.texts]


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


def test_gallery_and_path_panels_are_written(tmp_path):
  rng = np.random.default_rng(0)
  grids = {"density": rng.random((3, 8, 8, 8)).astype(np.float32),
           "species": np.zeros((3, 8, 8, 8), np.int32)}
  grids["species"][0, 4, 4, 4] = 14
  plots.plot_gallery(grids, ["Si", "(no_atoms)", "(no_lattice)"], SPEC, tmp_path / "g.png",
                     "random samples")
  plots.plot_path({"linear": grids, "slerp": grids}, ["a", "b", "c"], SPEC, tmp_path / "p.png",
                  "a → c")
  plots.plot_slices(grids["density"][0], grids["species"][0], SPEC, tmp_path / "s.png", "Si")
  for name in ("g.png", "p.png", "s.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG


def test_evaluation_figures_are_written_for_atoms_and_for_none(tmp_path):
  true = _atoms([8, 22], [[1, 1, 1], [5, 5, 5]])
  comparisons = [metrics.compare_atoms(_atoms([8], [[1.2, 1, 1]]), true),
                 metrics.compare_atoms(_atoms([], []), true)]
  paths = plots.save_evaluation_figures(tmp_path / "some", comparisons, mse=np.array([0.1, 0.2]))
  assert [p.name for p in paths] == ["voxel_errors.png", "atom_counts.png", "distances.png",
                                     "species.png"]
  nothing = [metrics.compare_atoms(_atoms([], []), true)]
  paths += plots.save_evaluation_figures(tmp_path / "none", nothing)
  for path in paths:
    assert path.read_bytes()[:8] == PNG
