"""Whatever a model decodes gives a crystal or a named reason, never an exception:
random and degenerate cubes (zeros, NaN, inf, single-voxel spikes, huge values, noise, two
overlapping crystals) through every path from a cube to atoms and a crystal, both
representations, the atoms read off the density or segmented."""

import csv
import dataclasses
import functools
import json

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
import threadpoolctl

from conftest import MATCHER
from crystal_vae import crystals
from crystal_vae import density_fit
from crystal_vae.configs import recipes
from crystal_vae import inference
from crystal_vae import modes
from crystal_vae import reconstruction
from crystal_vae import segmentation
from crystal_vae import writing

# Atoms read off the density: the smallest grid a config accepts (config_checks), where the fits
# are fastest; segmented: the quick config's 20³, where an atom's voxels are more than a fragment.
GRID = 8
SEGMENTED_GRID = 20
BOX = 10.0
PATHS = [(representation, atoms_from) for representation in ("repeat", "unit_cell")
         for atoms_from in ("density", "segmenter")]
TRUE_CELLS = {
    "nacl": Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                      [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "cscl": Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "srtio3": Structure(Lattice.cubic(3.905), ["Sr", "Ti", "O", "O", "O"],
                        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                         [0, 0.5, 0.5]]),
    "zno": Structure(Lattice.hexagonal(3.25, 5.2), ["Zn", "Zn", "O", "O"],
                     [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.38],
                      [2 / 3, 1 / 3, 0.88]]),
}


@functools.cache
def _model(representation: str, atoms_from: str, composition_head: bool = False,
           symprec: float = 0.0, grid: int = GRID) -> inference.TrainedModel:
  """The config-driven steps of a model (no variables): how a mode turns decoded grids into
  atoms and crystals."""
  config = recipes.get_config(representation, "quick")
  config.voxel.grid = grid
  config.eval.atoms_from = atoms_from
  config.model.composition_head = composition_head
  config.eval.symprec = symprec
  return inference.TrainedModel(config, variables=None)


@functools.cache
def _true_grids(representation: str, grid: int = GRID) -> dict[str, np.ndarray]:
  """The true grids of `TRUE_CELLS` (with their lattices), as a decoder would give them."""
  cells = [crystals.crystal_from_structure(s, name) for name, s in TRUE_CELLS.items()]
  grids = _model(representation, "segmenter", grid=grid).voxelize(cells)
  grids["lattice"] = np.stack([cell.lattice for cell in cells])
  return grids


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
  """The fits' small least-squares problems on one BLAS thread: on a machine shared with other
  jobs, BLAS threads waiting on each other made a cube of constant density take 30 s, not 0.5."""
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    yield


def _assert_crystal_or_reason(result: reconstruction.Reconstruction) -> None:
  """A crystal a CIF reader takes back (elements, a cell of positive volume, sites at least
  0.5 Å apart), or no crystal and a reason of `REASONS` with its detail."""
  if not result.valid:
    assert result.structure is None
    assert result.reason in reconstruction.REASONS and result.detail, result
    return
  structure = result.structure
  assert 1 <= len(structure) <= reconstruction.MAX_ATOMS
  assert all(1 <= site.specie.Z <= 118 for site in structure)
  assert np.all(np.isfinite(structure.lattice.matrix)) and structure.volume > 0
  if len(structure) > 1:
    distances = structure.distance_matrix + np.diag(np.full(len(structure), np.inf))
    assert distances.min() >= 0.5
  parsed = crystals.structure_from_cif(writing.to_cif(structure), "rebuilt")
  assert parsed.composition.almost_equals(structure.composition)


def _assert_atoms_or_reason(atoms: segmentation.Atoms) -> None:
  """Atoms of element-or-beyond Z at finite positions, or none and the reason why."""
  if atoms.reason is not None:
    assert len(atoms) == 0 and atoms.reason in reconstruction.REASONS and atoms.detail
    return
  assert np.all(np.isfinite(atoms.positions)) and np.all(atoms.species >= 1)


def _crystals_of(model: inference.TrainedModel, grids: dict[str, np.ndarray]
                 ) -> list[reconstruction.Reconstruction]:
  """`to_crystals` as evaluate calls it, checking the atoms it reads on the way."""
  atoms = None
  if not model.fits_repeat_cube:
    atoms = model.atoms(grids)
    for cube_atoms in atoms:
      _assert_atoms_or_reason(cube_atoms)
  return model.to_crystals(grids, atoms)


_VALUES = st.sampled_from([0.0, -1.0, 1e-30, 0.05, 1.0, 3.0, 1e6, 1e30, 3e38]) | st.floats(-10, 10)
_SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf])


@st.composite
def _decoded_cubes(draw, representation: str, grid: int) -> dict[str, np.ndarray]:
  """One decoded cube: density, species grid, lattice and composition (fractions per Z), each
  drawn from what an untrained, diverging or unusual model gives."""
  true = _true_grids(representation, grid)
  shape = (grid,) * 3
  index = draw(st.integers(0, len(TRUE_CELLS) - 1))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  species = true["species"][index]
  kind = draw(st.sampled_from(["crystal", "two_crystals", "blobs", "noise", "spike", "constant",
                               "poisoned"]))
  if kind == "constant":  # (a plateau of moderate values is 64 atoms at 8³: seconds to fit)
    density = np.full(shape, draw(st.sampled_from([0.0, -1.0, 1e-30, 1e30, 3e38]) | _SPECIAL))
  elif kind == "spike":
    density = np.zeros(shape)
    density[tuple(draw(st.tuples(*[st.integers(0, grid - 1)] * 3)))] = draw(_VALUES | _SPECIAL)
  elif kind == "noise":
    density = rng.random(shape) * draw(st.sampled_from([1e-3, 0.1, 0.5, 1e30]))
  elif kind == "blobs":  # Gaussians of random Z (beyond the periodic table too) anywhere
    count = draw(st.integers(1, 6))
    centres, z = rng.random((count, 3)) * BOX, rng.integers(1, 200, count)
    axis = (np.arange(grid) + 0.5) * BOX / grid
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    squared = ((points[..., None, :] - centres) ** 2).sum(axis=-1)
    density = (z * np.exp(-squared / 2)).sum(axis=-1) / (2 * np.pi) ** 1.5
  elif kind == "crystal":
    density = true["density"][index] * draw(st.sampled_from([1.0, 1e-6, -1.0, 1e6, 1e30]))
  elif kind == "two_crystals":  # two crystals' densities overlapping, the second shifted
    other = draw(st.integers(0, len(TRUE_CELLS) - 1))
    shift = draw(st.tuples(*[st.integers(0, grid - 1)] * 3))
    density = true["density"][index] + np.roll(true["density"][other], shift, axis=(0, 1, 2))
    shifted = np.roll(true["species"][other], shift, axis=(0, 1, 2))
    species = np.where(species > 0, species, shifted)
  else:  # a crystal with a few NaN or infinite voxels
    density = true["density"][index].copy()
    poisoned = draw(st.lists(st.integers(0, grid ** 3 - 1), min_size=1, max_size=5))
    density.reshape(-1)[poisoned] = draw(_SPECIAL)
  species_kind = draw(st.sampled_from(["true", "random", "empty", "beyond_table"]))
  if species_kind == "random":
    species = rng.integers(0, 101, shape) * (rng.random(shape) < draw(st.sampled_from([0.1, 0.9])))
  elif species_kind == "empty":
    species = np.zeros(shape)
  elif species_kind == "beyond_table":
    species = np.where(species > 0, draw(st.integers(119, 300)), 0)
  lattice_kind = draw(st.sampled_from(["true", "random", "nan", "zero", "flat", "huge"]))
  lattice = {"true": true["lattice"][index], "random": rng.normal(0, 5, (3, 3)),
             "nan": np.full((3, 3), np.nan), "zero": np.zeros((3, 3)),
             "flat": np.array([[4.0, 0, 0], [0, 4, 0], [4, 4, 1e-9]]),
             "huge": np.eye(3) * 1e30}[lattice_kind]
  composition = draw(st.sampled_from(["true", "random", "nan"]))
  composition = {"true": true["composition"][index], "random": rng.dirichlet(np.ones(101)),
                 "nan": np.full(101, np.nan)}[composition]
  return {"density": density[None].astype(np.float32), "species": species[None].astype(np.int32),
          "lattice": lattice[None], "composition": composition[None]}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("representation, atoms_from", PATHS)
@hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@pytest.mark.slow
@hypothesis.given(data=st.data())
def test_any_decoded_cube_gives_a_crystal_or_a_named_reason(representation, atoms_from, data):
  grid = GRID if atoms_from == "density" else SEGMENTED_GRID
  model = _model(representation, atoms_from, data.draw(st.booleans(), "composition head"),
                 data.draw(st.sampled_from([0.0, 0.8]), "symprec"), grid)
  grids = data.draw(_decoded_cubes(representation, grid), "decoded cube")
  (result,) = _crystals_of(model, grids)
  hypothesis.event("outcome", result.reason or "crystal")
  _assert_crystal_or_reason(result)


def _one_cube(representation: str, density: np.ndarray, index: int = 0, grid: int = GRID
              ) -> dict[str, np.ndarray]:
  true = _true_grids(representation, grid)
  return {"density": density[None].astype(np.float32), "species": true["species"][index:index + 1],
          "lattice": true["lattice"][index:index + 1]}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("representation, atoms_from", PATHS)
@pytest.mark.parametrize("value, poisoned, reason", [
    (np.nan, GRID ** 3, reconstruction.NON_FINITE),
    (np.inf, GRID ** 3, reconstruction.NON_FINITE),
    (-np.inf, 1, reconstruction.NON_FINITE),
    (np.nan, 1, reconstruction.NON_FINITE),
    (0.0, GRID ** 3, reconstruction.NO_ATOMS),
])
def test_a_non_finite_or_empty_density_is_named(representation, atoms_from, value, poisoned,
                                                reason):
  """A NaN or infinite voxel anywhere (the rest rock salt's true density) gives no crystal and
  says how many voxels are not finite; an all-zero density has no atoms, whatever the species
  grid says."""
  density = _true_grids(representation)["density"][0].copy()
  density.reshape(-1)[:poisoned] = value
  (result,) = _crystals_of(_model(representation, atoms_from), _one_cube(representation, density))
  assert not result.valid and result.reason == reason, result
  if reason == reconstruction.NON_FINITE:
    assert result.detail.startswith(f"{poisoned} of {GRID ** 3} values of the decoded density")


@pytest.mark.parametrize("representation, atoms_from", [
    ("repeat", "density"), ("unit_cell", "density"), ("unit_cell", "segmenter")])
def test_a_non_finite_composition_is_named(representation, atoms_from):
  """A composition head's NaN fractions (its logits diverged) with true grids: before, the
  elements chosen from them were left unset (`np.empty`: whatever memory held)."""
  grid = GRID if atoms_from == "density" else SEGMENTED_GRID
  grids = dict(_true_grids(representation, grid))
  grids["composition"] = np.full_like(grids["composition"], np.nan)
  model = _model(representation, atoms_from, composition_head=True, grid=grid)
  for result in _crystals_of(model, grids):
    assert result.reason == reconstruction.NON_FINITE
    assert result.detail == "101 of 101 values of the decoded composition are NaN or infinite"


def test_segmented_atoms_of_other_cubes_do_not_see_a_non_finite_cube():
  grids = _true_grids("repeat")
  density = grids["density"][:2].copy()
  density[0, 3, 4, 5] = np.nan
  atoms = segmentation.segment_batch(grids["species"][:2], BOX, density=density)
  alone = segmentation.segment(grids["species"][1], BOX, density=grids["density"][1])
  assert atoms[0].reason == segmentation.NON_FINITE and len(atoms[0]) == 0
  assert atoms[1].reason is None
  np.testing.assert_array_equal(atoms[1].species, alone.species)
  np.testing.assert_allclose(atoms[1].positions, alone.positions, rtol=1e-12)


@pytest.mark.parametrize("representation", ["repeat", "unit_cell"])
def test_a_segmented_z_beyond_the_periodic_table_is_named(representation):
  """Rock salt's Na voxels segmented as Z 122 (at 30³, where the segmented true grid gives rock
  salt): the site's species is no element."""
  grids = dict(_true_grids(representation, 30))
  model = _model(representation, "segmenter", grid=30)
  (result, *_) = model.to_crystals(grids)
  assert result.valid and MATCHER.fit(result.structure, TRUE_CELLS["nacl"])
  grids["species"] = np.where(grids["species"] == 11, 122, grids["species"])
  (result, *_) = model.to_crystals(grids)
  assert not result.valid and result.reason == reconstruction.Z_OUT_OF_RANGE
  assert "122" in result.detail


def test_a_fitted_z_of_122_is_named_not_raised():
  """The issue's case: a unit cell's atom read off the density as two shares of Z 61 on opposite
  faces of the cell is one site of Z 61 + 61 = 122, beyond Og (118); before, pymatgen raised
  `Can't parse Element or Species from 122` and ended the evaluation."""
  a = 4.0
  corner = BOX / 2 - a / 2
  frac = np.array([[0.5, 0.5, 0.5], [0.5, -0.05, 0.5], [0.5, 1.05, 0.5]])
  atoms = segmentation.Atoms(np.array([8, 61, 61], np.int32), corner + a * frac,
                             np.zeros(3, np.int64), np.zeros(3, bool))
  result = reconstruction.reconstruct_unit_cell(atoms, a * np.eye(3), BOX, fitted_z=True)
  assert not result.valid and result.reason == reconstruction.Z_OUT_OF_RANGE
  assert "Z of 122" in result.detail
  # Shares of Z 4 + 4 are one O: the same cell is a crystal.
  atoms = dataclasses.replace(atoms, species=np.array([8, 4, 4], np.int32))
  result = reconstruction.reconstruct_unit_cell(atoms, a * np.eye(3), BOX, fitted_z=True)
  assert result.valid and sorted(s.specie.Z for s in result.structure) == [8, 8]


@pytest.mark.parametrize("max_atoms, valid", [(1, False), (2, True)])
def test_a_cell_of_more_sites_than_max_atoms_is_named(max_atoms, valid):
  """Rock salt's primitive cell has 2 sites: at most 1 allowed, each path says too many atoms."""
  repeat = _true_grids("repeat", 30)
  fit = density_fit.DensityFit(repeat["density"][0], BOX, 1.0, 5.0)
  atoms = segmentation.segment(repeat["species"][0], BOX)
  unit_cell = _true_grids("unit_cell", 30)
  unit_atoms = segmentation.segment(unit_cell["species"][1], BOX)  # CsCl: 2 sites
  results = [
      reconstruction.reconstruct_repeat(atoms, BOX, max_atoms=max_atoms),
      reconstruction.reconstruct_repeat_from_density(fit, max_z=100, min_z=3.0,
                                                     max_atoms=max_atoms),
      reconstruction.reconstruct_unit_cell(unit_atoms, unit_cell["lattice"][1], BOX,
                                           max_atoms=max_atoms)]
  for result in results:
    if valid:
      assert result.valid and len(result.structure) == 2, result
    else:
      assert result.reason == reconstruction.TOO_MANY_ATOMS, result
      assert "more than 1" in result.detail


def test_a_cube_of_noise_with_too_many_atoms_is_named_at_once():
  """A repeat cube segmented into 2,250 atoms (more than one per Å³) and a unit cell whose
  constant density has an atom's peak every 1.8 Å (more than `MAX_ATOMS`) are refused before
  any fit."""
  species = np.zeros((30, 30, 30), np.int32)
  species[::2, ::2, :] = 1 + (np.arange(30) // 3 % 2)
  atoms = segmentation.segment(species, BOX)
  assert len(atoms) == 2250
  result = reconstruction.reconstruct_repeat(atoms, BOX)
  assert result.reason == reconstruction.TOO_MANY_ATOMS and "2250 atoms" in result.detail
  density = np.ones((16, 16, 16))
  atoms = density_fit.atoms_from_density(density, BOX, 1.0, 100, min_z=3.0)
  assert len(atoms) == 0 and atoms.reason == segmentation.TOO_MANY_ATOMS
  (result,) = _model("unit_cell", "density", grid=16).to_crystals(
      _one_cube("unit_cell", density, grid=16))
  assert result.reason == reconstruction.TOO_MANY_ATOMS


def test_noise_whose_atoms_are_all_too_light_has_no_atoms():
  """Weak noise: every atom fitted to it is lighter than min_z and dropped in the first round
  (before, the refit of no atoms raised `cannot reshape array of size 0`)."""
  density = np.random.default_rng(1).random((12, 12, 12)) * 0.1
  atoms = density_fit.atoms_from_density(density, BOX, 1.0, 100, min_z=3.0)
  assert len(atoms) == 0 and atoms.reason is None


@pytest.mark.parametrize("lattice, detail", [
    (np.eye(3) * 1e30, "a cell vector is 1e+30 Å long, more than 3 cube sides (30 Å)"),
    (np.diag([1e6, 4.0, 4.0]), "a cell vector is 1e+06 Å long, more than 3 cube sides (30 Å)"),
    (np.diag([31.0, 4.0, 4.0]), "a cell vector is 31 Å long, more than 3 cube sides (30 Å)"),
    ([[12, 5, 0], [-3, 14, 0], [9, 19, 0.01]], "lattice planes 0.01 Å apart (< 1.0 Å)"),
    (np.diag([4.0, 4.0, 0.9]), "lattice planes 0.9 Å apart (< 1.0 Å)"),
])
def test_a_unit_cell_no_crystal_has_is_an_invalid_lattice(lattice, detail):
  """A lattice head's cell with a vector longer than three cube sides, or lattice planes closer
  than any crystal's: before, pymatgen's Niggli reduction of the 1e30 Å cell ran for more than
  10 minutes, of the flat one (1.8 Å³ over 12 to 21 Å sides) 99 s, to a "crystal"."""
  atoms = segmentation.Atoms(np.array([8, 26], np.int32), np.array([[5.0, 5, 5], [6.5, 5, 5]]),
                             np.zeros(2, np.int64), np.zeros(2, bool))
  result = reconstruction.reconstruct_unit_cell(atoms, np.asarray(lattice, float), BOX)
  assert result.reason == reconstruction.INVALID_LATTICE and result.detail.startswith(detail)
  # Planes 1.2 Å apart are a crystal's.
  assert reconstruction.reconstruct_unit_cell(atoms, np.diag([4.0, 4.0, 1.2]), BOX).valid


@pytest.fixture(scope="module")
def cif_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("three_cifs")
  for name in ("nacl", "cscl", "srtio3"):
    TRUE_CELLS[name].to(filename=str(directory / f"{name}.cif"))
  return directory


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("representation", ["repeat", "unit_cell"])
def test_evaluate_counts_broken_cubes_in_its_summary_and_invalid_csv(representation, cif_dir,
                                                                     tfds_dir, tmp_path,
                                                                     monkeypatch):
  """The oracle's grids with CsCl's density NaN and SrTiO3's Sr segmented as Z 122: the
  evaluation ends, rock salt is a crystal and the two others are counted by reason."""
  config = recipes.get_config(representation)
  config.dataset.name = "cif_dir"
  config.dataset.path = str(cif_dir)
  config.dataset.split_fractions = (0.0, 1.0, 0.0)
  config.dataset.data_dir = tfds_dir
  config.eval.oracle = True
  config.eval.atoms_from = "segmenter"
  real_voxelize = inference.TrainedModel.voxelize

  def broken_voxelize(self, structures, **kwargs):
    grids = {key: np.array(value) for key, value in real_voxelize(self, structures,
                                                                  **kwargs).items()}
    ids = [crystal.id for crystal in structures]
    grids["density"][ids.index("cscl")] = np.nan
    species = grids["species"][ids.index("srtio3")]
    species[species == 38] = 122
    return grids

  monkeypatch.setattr(inference.TrainedModel, "voxelize", broken_voxelize)
  results = modes.run("evaluate", config, str(tmp_path))
  assert results["num_samples"] == 3 and results["valid_rate"] == pytest.approx(1 / 3)
  expected = {"cscl": reconstruction.NON_FINITE, "srtio3": reconstruction.Z_OUT_OF_RANGE}
  assert results["invalid_reasons"] == {reason: 1 for reason in expected.values()}
  out = tmp_path / "eval" / "validation-oracle"
  assert json.loads((out / "metrics.json").read_text())["invalid_reasons"] == (
      results["invalid_reasons"])
  with open(out / "cifs" / "invalid.csv", newline="") as handle:
    rows = {row["id"]: row for row in csv.DictReader(handle)}
  assert {name: row["reason"] for name, row in rows.items()} == expected
  assert all(row["detail"] for row in rows.values())
  assert [path.stem for path in (out / "cifs").glob("*.cif")] == ["nacl"]
