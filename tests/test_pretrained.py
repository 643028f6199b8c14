"""The shipped pretrained models restore from a fresh clone and rebuild known crystals: a perov_5
crystal (`pretrained/perov5_repeat`, `pretrained/perov5_unit_cell`), and a rock-salt and a
hexagonal Materials Project crystal (`pretrained/mp_unit_cell`)."""

import pathlib
import warnings

import ml_collections
import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import FrameworkComparator, StructureMatcher
from pymatgen.core import Lattice, Structure

from crystal_vae import crystals, evaluate, inference, metrics

PRETRAINED = pathlib.Path(__file__).resolve().parents[1] / "pretrained" / "perov5_repeat"
PRETRAINED_UNIT_CELL = PRETRAINED.parent / "perov5_unit_cell"
PRETRAINED_MP_UNIT_CELL = PRETRAINED.parent / "mp_unit_cell"
# perov_5 validation crystal 13328: cubic GaAsO2F, a = 3.9486 Å (As at the corner, Ga at the
# body centre, O and F at the face centres), as stored in the dataset.
GA_AS_O2_F = crystals.Crystal(
    "13328", np.eye(3) * 3.948617458343506,
    np.array([[0.4996875, 0.0, 0.5], [0.4997619, 0.5, 0.0], [0.0044131, 0.5, 0.5],
              [0.0004185, 0.0, 0.0], [0.5056678, 0.5, 0.5]]),
    np.array([9, 8, 8, 33, 31]))


@pytest.fixture(scope="module")
def model() -> inference.TrainedModel:
  return inference.TrainedModel.restore(PRETRAINED)


@pytest.mark.parametrize("workdir", sorted(p for p in PRETRAINED.parent.iterdir() if p.is_dir()),
                         ids=lambda p: p.name)
def test_pretrained_workdir_is_small_and_complete(workdir):
  size = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file())
  assert size < 25 * 2**20
  assert (workdir / "metrics.jsonl").stat().st_size > 0
  assert (workdir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretrained_unit_cell_model_rebuilds_a_known_perov_5_crystal():
  """The unit cell (unrotated, as evaluation places it) decoded, its atoms read off the density,
  its lattice from the lattice head: GaAsO2F itself, the O on the b = 0 face included."""
  model = inference.TrainedModel.restore(PRETRAINED_UNIT_CELL)
  assert model.config.representation == "unit_cell" and model.fits_density
  grids = model.voxelize([GA_AS_O2_F])
  _, decoded = model.reconstruct(grids)
  assert metrics.voxel_mse(decoded["density"], grids["density"])[0] < 0.001
  np.testing.assert_allclose(decoded["lattice"][0], GA_AS_O2_F.lattice, atol=0.1)
  [result] = model.to_crystals(decoded)
  assert result.valid, result.detail
  rebuilt, true = result.structure, GA_AS_O2_F.to_structure()
  assert sorted(site.specie.Z for site in rebuilt) == [8, 8, 9, 31, 33]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3).fit(rebuilt, true)


# Two crystals of the Materials Project's test split (never trained on), built by hand from their
# space group and lattice parameters, primitive cells as the Materials Project stores them:
# rock-salt SrS (mp-1087, Fm-3m, a = 6.064 Å) and NiAs-type TiAs (mp-10052, P6_3/mmc,
# a = 3.670 Å, c = 6.106 Å, Ti at 2a, As at 2c).
ROCK_SALT_SR_S = Structure.from_spacegroup("Fm-3m", Lattice.cubic(6.064), ["Sr", "S"],
                                           [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure()
HEXAGONAL_TI_AS = Structure.from_spacegroup("P6_3/mmc", Lattice.hexagonal(3.670, 6.106),
                                            ["Ti", "As"], [[0, 0, 0.5], [2 / 3, 1 / 3, 0.75]])


@pytest.mark.parametrize("structure", [ROCK_SALT_SR_S, HEXAGONAL_TI_AS],
                         ids=lambda s: s.composition.reduced_formula)
def test_pretrained_materials_project_model_rebuilds_a_known_crystal(structure):
  """Voxelised as at evaluation, encoded, decoded and read off the density: the same crystal
  (CDVAE's StructureMatcher) with the same atoms and a cell volume within 15% of the true one."""
  model = inference.TrainedModel.restore(PRETRAINED_MP_UNIT_CELL)
  assert model.config.representation == "unit_cell"
  limits = crystals.CrystalLimits(box=model.config.dataset.box, max_z=model.config.dataset.max_z,
                                  max_atoms=model.config.dataset.max_atoms)
  true = crystals.crystal_from_structure(structure, "known", limits)
  _, decoded = model.reconstruct(model.voxelize([true]))
  [result] = model.to_crystals(decoded)
  assert result.valid, result.detail
  assert sorted(site.specie.Z for site in result.structure) == sorted(structure.atomic_numbers)
  np.testing.assert_allclose(result.structure.volume, structure.volume, rtol=0.15)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert metrics.structure_matcher().fit(result.structure, structure)


def test_pretrained_model_rebuilds_a_known_perov_5_crystal(model):
  assert model.config.dataset.name == "perov_5" and model.fits_density
  grids = model.voxelize([GA_AS_O2_F])
  mean, _ = model.encode(grids["density"], composition=grids["composition"])
  decoded = model.decode(mean)
  assert metrics.voxel_mse(decoded["density"], grids["density"])[0] < 0.005
  [result] = model.to_crystals(decoded)
  assert result.valid, result.detail
  rebuilt, true = result.structure, GA_AS_O2_F.to_structure()
  assert len(rebuilt) == 5
  np.testing.assert_allclose(sorted(rebuilt.lattice.abc), [3.9486] * 3, rtol=0.01)
  np.testing.assert_allclose(rebuilt.lattice.angles, [90.0] * 3, atol=1.0)
  framework = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3, comparator=FrameworkComparator())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert framework.fit(rebuilt, true)
  # Species (the decoded composition and the sites' Z, `species_from_composition`): the crystal
  # itself, Ga As O2 F (before the composition head was refitted on the latent: O3 Ga Ge).
  assert sorted(site.specie.Z for site in rebuilt) == [8, 8, 9, 31, 33]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3).fit(rebuilt, true)


def test_fitted_and_true_z_pairs_the_sites_of_a_known_crystal(model):
  """`evaluate.fitted_and_true_z` (behind `launch/species_errors.py`) on GaAsO2F: one (fitted,
  true) pair per distinct site, the true Z the crystal's own, the fitted Z within 2.5 units of
  them (as the rebuilt species above)."""
  pairs = evaluate.fitted_and_true_z(model, [GA_AS_O2_F])
  assert pairs.shape == (5, 2)
  assert sorted(pairs[:, 1].astype(int).tolist()) == [8, 8, 9, 31, 33]
  assert np.all(np.abs(pairs[:, 0] - pairs[:, 1]) <= 2.5), pairs


def test_pretrained_property_head_predicts_the_heat_of_formation_of_a_known_crystal(model):
  """The shipped `heat_all` head (fitted on the frozen latent, `head_fit.py`): GaAsO2F's
  stored heat_all is 0.86 eV/atom, the training mean 1.47; the head is closer to the truth by
  at least half that gap."""
  assert tuple(model.config.model.properties) == ("heat_all",)
  means, _ = model.encode_crystals([GA_AS_O2_F])
  [[predicted]] = model.predict_properties(means)
  true, training_mean = 0.86, model.config.model.property_means[0]
  assert abs(predicted - true) < abs(training_mean - true) / 2, predicted


def test_the_first_refinement_step_moves_each_coordinate_by_the_rate_down_the_mse(model):
  """Adam's first step on a latent is the learning rate times the sign of the gradient: every
  coordinate moves by 0.01, downhill for the voxel MSE as central differences of the decoded
  density against the true one give it."""
  grids = model.voxelize([GA_AS_O2_F])
  mean, _ = model.encode(grids["density"], composition=grids["composition"])
  moved = model.refine(mean, grids["density"], steps=1, learning_rate=0.01) - mean
  np.testing.assert_allclose(np.abs(moved), 0.01, atol=2e-4)  # |g| / (|g| + 1e-8) of Adam

  def mse(z):
    return metrics.voxel_mse(model.decode(z)["density"], grids["density"])[0]

  checked = 0
  for index in range(0, mean.shape[1], max(1, mean.shape[1] // 8)):
    step = np.zeros_like(mean)
    step[0, index] = 0.05
    slope = (mse(mean + step) - mse(mean - step)) / 0.1
    if abs(slope) > 1e-4:
      assert np.sign(moved[0, index]) == -np.sign(slope), (index, slope)
      checked += 1
  assert checked >= 3


def test_a_refined_reconstruction_is_closer_and_keeps_the_mean_composition(model):
  config = ml_collections.ConfigDict(model.config.to_dict())
  config.eval.refine_steps = 10
  refining = inference.TrainedModel(config, model.variables)
  grids = model.voxelize([GA_AS_O2_F])
  mean, decoded = model.reconstruct(grids)
  refined_mean, refined = refining.reconstruct(grids)
  np.testing.assert_array_equal(refined_mean, mean)
  plain = model.decode(mean)
  np.testing.assert_array_equal(decoded["density"], plain["density"])
  before = metrics.voxel_mse(plain["density"], grids["density"])[0]
  after = metrics.voxel_mse(refined["density"], grids["density"])[0]
  assert after < 0.8 * before, (before, after)
  np.testing.assert_array_equal(refined["composition"], plain["composition"])
  [result] = refining.to_crystals(refined)
  assert result.valid, result.detail
  assert sorted(site.specie.Z for site in result.structure) == [8, 8, 9, 31, 33]
