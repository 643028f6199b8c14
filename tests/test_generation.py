"""Generation modes on a tiny trained checkpoint: sample, interpolate, traverse, conditional."""

import csv
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from conftest import small_config, tiny_config, trained_checkpoint
from crystal_vae import conditional
from crystal_vae import crystals
from crystal_vae import datasets
from crystal_vae.configs import recipes
from crystal_vae import generation
from crystal_vae import generation_metrics
from crystal_vae import inference
from crystal_vae import latent_prior
from crystal_vae import metrics
from crystal_vae import modes
from crystal_vae import reconstruction
from crystal_vae import writing

REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tfds_dir) -> pathlib.Path:
  return trained_checkpoint(tmp_path_factory, tfds_dir)


@pytest.fixture(scope="module")
def model(workdir) -> inference.TrainedModel:
  return inference.TrainedModel.restore(workdir)


def _rock_salt() -> Structure:
  return Structure(Lattice.cubic(5.64), ["Na"] * 4 + ["Cl"] * 4,
                   [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0],
                    [.5, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5]])


def _assert_accounted(directory: pathlib.Path, num: int) -> list[Structure]:
  """valid CIFs + invalid.csv rows = num, each CIF parses; returns the parsed structures."""
  with open(directory / "invalid.csv") as handle:
    invalid = list(csv.DictReader(handle))
  cifs = sorted(directory.glob("*.cif"))
  assert len(cifs) + len(invalid) == num
  assert {row["reason"] for row in invalid} <= set(reconstruction.REASONS)
  assert not {path.stem for path in cifs} & {row["id"] for row in invalid}
  return [Structure.from_file(path) for path in cifs]


def _is_png(path: pathlib.Path) -> bool:
  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  """Pearson's r by its definition."""
  a, b = a - a.mean(), b - b.mean()
  return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def _periodic_distances(structure: Structure) -> np.ndarray:
  """(sites, sites) distances (Å) from each site to the nearest periodic image of each site, its
  own images other than itself on the diagonal: a numpy loop over the 5³ cells around the
  Niggli-reduced cell."""
  structure = structure.get_reduced_structure()
  frac = np.mod(structure.frac_coords, 1.0)
  shifts = np.array(list(itertools.product(range(-2, 3), repeat=3)), np.float64)
  vectors = (frac[None, :, None, :] + shifts[None, None] - frac[:, None, None, :])
  distances = np.linalg.norm(vectors @ structure.lattice.matrix, axis=-1)
  own = np.arange(len(frac))
  distances[own, own, len(shifts) // 2] = np.inf  # the zero shift: the site itself
  return distances.min(axis=-1)


# Composition validity, distances and statistics against hand-computed cases.


@pytest.mark.parametrize("numbers, expected", [
    ([11, 17], True),             # NaCl
    ([11, 17, 17], False),        # NaCl2: Na is only +1
    ([11, 11, 17, 17], True),     # Na2Cl2 reduces to NaCl
    ([26, 26, 8, 8, 8], True),    # Fe2O3
    ([11], True),                 # one element
    ([29, 30], True),             # CuZn: metals only (an alloy)
    ([], False),
])
def test_smact_validity_hand_cases(numbers, expected):
  assert metrics.smact_valid(numbers) is expected


def test_compositions_with_too_many_oxidation_state_combinations_are_not_searched():
  """Fe2O3: Fe has 6 SMACT oxidation states, O has 2 (12 combinations, Fe +3 / O -2 neutral).
  With a cap below 12 it counts as invalid without the search; at 12 it is searched."""
  from crystal_vae.metrics import _oxidation_states  # pylint: disable=g-import-not-at-top
  combinations = len(_oxidation_states("Fe")[0]) * len(_oxidation_states("O")[0])
  assert metrics.smact_valid([26, 26, 8, 8, 8], max_combinations=combinations)
  assert not metrics.smact_valid([26, 26, 8, 8, 8], max_combinations=combinations - 1)


def test_alloys_need_include_alloys():
  assert not metrics.smact_valid([29, 30], include_alloys=False)  # no anion: never neutral


def test_periodic_distances_of_known_structures():
  np.testing.assert_allclose(_periodic_distances(_rock_salt()).min(axis=1), 5.64 / 2)
  simple = Structure(Lattice.tetragonal(3.0, 4.0), ["Po"], [[0, 0, 0]])
  np.testing.assert_allclose(_periodic_distances(simple), [[3.0]])
  pair = Structure(Lattice.cubic(5.0), ["O", "O"], [[0, 0, 0], [0.9, 0, 0]])  # 0.5 Å apart
  np.testing.assert_allclose(_periodic_distances(pair), [[5.0, 0.5], [0.5, 5.0]])


def test_nearest_neighbour_distances_of_known_structures():
  np.testing.assert_allclose(generation.nearest_neighbour_distances(_rock_salt()), 5.64 / 2)
  bcc = Structure(Lattice.cubic(4.23), ["Na", "Na"], [[0, 0, 0], [.5, .5, .5]])
  np.testing.assert_allclose(generation.nearest_neighbour_distances(bcc), np.sqrt(3) / 2 * 4.23)
  simple = Structure(Lattice.tetragonal(3.0, 4.0), ["Po"], [[0, 0, 0]])
  np.testing.assert_allclose(generation.nearest_neighbour_distances(simple), 3.0)


@pytest.mark.slow
def test_sample_summary_hand_case():
  salt = _rock_salt()
  sodium = Structure(Lattice.cubic(4.23), ["Na", "Na"], [[0, 0, 0], [.5, .5, .5]])
  salt2 = Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [.5, .5, .5], [0, .5, .5]])
  rebuilt = [reconstruction.Reconstruction(s) for s in (salt, sodium, salt2)]
  rebuilt.append(reconstruction.Reconstruction(None, reconstruction.NO_ATOMS, ""))
  reference = [salt, salt]
  summary = generation.sample_summary(rebuilt, reference,
                                      generation_metrics.fingerprints(reference), (0.2, 4.0))
  assert summary["valid_fraction"] == 3 / 4
  assert summary["cdvae_composition_valid"] == 2 / 4  # NaCl2 fails, the missing one counts
  assert summary["cdvae_valid"] == 2 / 4
  # CDVAE-valid samples NaCl and Na: number of elements {2, 1} vs {2, 2}.
  assert summary["wasserstein_num_elements"] == pytest.approx(1 / 2)
  expected = np.mean(sorted(abs(s.density - salt.density) for s in (salt, sodium)))
  assert summary["wasserstein_density"] == pytest.approx(expected)
  assert summary["cov_recall"] == 1.0 and summary["cov_precision"] == 1 / 4


# Latent paths against closed forms.


def test_interpolation_paths_against_closed_forms():
  a, b = np.eye(4, dtype=np.float32)[0] * 2, np.eye(4, dtype=np.float32)[1] * 2
  linear = generation.interpolate_latents(a, b, 5, "linear")
  np.testing.assert_allclose(linear[2], (a + b) / 2)
  slerp = generation.interpolate_latents(a, b, 5, "slerp")
  t = np.linspace(0, 1, 5)[:, None]
  np.testing.assert_allclose(slerp, np.cos(t * np.pi / 2) * a + np.sin(t * np.pi / 2) * b,
                             atol=1e-6)
  np.testing.assert_array_equal(slerp[[0, -1]], np.stack([a, b]))
  parallel = generation.interpolate_latents(a, 3 * a, 3, "slerp")
  np.testing.assert_allclose(parallel[1], 2 * a)
  with pytest.raises(ValueError):
    generation.interpolate_latents(a, b, 3, "cubic")


def test_traverse_sets_one_coordinate():
  z = np.arange(5, dtype=np.float32)
  path = generation.traverse_latents(z, 2, [-3.0, 0.0, 3.0])
  np.testing.assert_array_equal(path[:, 2], [-3.0, 0.0, 3.0])
  np.testing.assert_array_equal(np.delete(path, 2, axis=1), np.tile(np.delete(z, 2), (3, 1)))
  with pytest.raises(ValueError):
    generation.traverse_latents(z, 5, [0.0])


# CIF writing on a deterministic case: the true grids of rock salt and an empty grid.


def test_true_grids_rebuild_and_write_parseable_cifs(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir)
  config.voxel.grid = 30
  model = inference.TrainedModel(config, variables=None)  # voxelise and rebuild need no weights
  salt = crystals.crystal_from_structure(_rock_salt(), "NaCl", crystals.CrystalLimits())
  grids = {key: np.array(value) for key, value in model.voxelize([salt, salt]).items()}
  grids["species"][1] = 0  # nothing segmented and no density: no atoms
  grids["density"][1] = 0
  rebuilt = model.to_crystals(grids)
  counts = generation.write_cifs(rebuilt, ["salt", "empty"], tmp_path)
  assert counts == {"valid": 1, "invalid": 1, "invalid_no_atoms": 1}
  (parsed,) = _assert_accounted(tmp_path, 2)
  assert StructureMatcher().fit(parsed, _rock_salt())
  with open(tmp_path / "invalid.csv") as handle:
    assert [row["id"] for row in csv.DictReader(handle)] == ["empty"]


# Modes on the tiny checkpoint.


@pytest.mark.slow
def test_sampling_is_reproducible_from_the_seed(model):
  z, grids, _ = generation.generate(model, 3, seed=7, batch_size=4)
  z_again, grids_again, _ = generation.generate(model, 3, seed=7, batch_size=4)
  z_other, grids_other, _ = generation.generate(model, 3, seed=8, batch_size=4)
  np.testing.assert_array_equal(z, z_again)
  np.testing.assert_array_equal(grids["density"], grids_again["density"])
  np.testing.assert_array_equal(grids["species"], grids_again["species"])
  assert not np.array_equal(z, z_other)
  assert not np.array_equal(grids["density"], grids_other["density"])
  np.testing.assert_array_equal(latent_prior.GaussianPrior.standard(8).sample(3, 7, 2.0), 2 * z)
  # Batching does not change the decoded grids: padded batches of 4 vs one batch of 3.
  np.testing.assert_allclose(model.decode(z)["density"], grids["density"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_the_prior_is_fitted_to_the_crystals_the_model_reconstructs_best():
  """The shipped perov_5 model reconstructs perov_5 crystals (voxel MSE 0.001-0.003) far better
  than rock salt, hcp Mg or fcc Cu (0.02-0.25): asked for the best 4 of the 7, interleaved,
  `best_reconstructed` gives exactly the perov_5 crystals' latent means, in their order."""
  model = inference.TrainedModel.restore(REPO / "pretrained" / "perov5_repeat")
  limits = crystals.CrystalLimits(box=model.config.dataset.box, max_z=model.config.dataset.max_z,
                                  max_atoms=model.config.dataset.max_atoms)
  perov = generation.split_crystals(model.config, "validation", 4)
  others = [crystals.crystal_from_structure(structure, name, limits) for name, structure in (
      ("NaCl", _rock_salt().get_primitive_structure()),
      ("Mg", Structure(Lattice.hexagonal(3.21, 5.21), ["Mg", "Mg"],
                       [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]])),
      ("Cu", Structure(Lattice.cubic(3.61), ["Cu"] * 4,
                       [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]]).get_primitive_structure()))]
  mixed = [others[0], perov[0], others[2], perov[1], perov[2], others[1], perov[3]]
  np.testing.assert_allclose(generation.best_reconstructed(model, mixed, 4 / 7, batch_size=4),
                             model.encode_crystals(perov)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(generation.best_reconstructed(model, mixed, 1.0, batch_size=4),
                             model.encode_crystals(mixed)[0], rtol=1e-5, atol=1e-5)


def test_sample_mode_fits_saves_and_reuses_its_prior(model, tmp_path, capsys):
  """`sample.prior=fitted`: the Gaussian of the chosen training crystals' latent means (its mean
  is theirs), saved in the model's workdir with the checkpoint step and reused by the next run
  (same draws); the default prior is the learned one; an unknown prior is refused."""
  settings = ml_collections.ConfigDict(model.config.sample.to_dict())
  settings.update(num=4, batch_size=4, num_train_structures=6, gallery=2, num_reference=3,
                  prior="fitted", prior_crystals=12)
  shutil.rmtree(model.workdir / "latent_prior", ignore_errors=True)
  summary = generation.sample(model, settings, tmp_path / "first")
  saved = np.load(model.workdir / "latent_prior" / "prior.npz")
  chosen = generation.training_crystals(model.config, 12, settings.seed)
  np.testing.assert_allclose(saved["mean"], model.encode_crystals(chosen)[0].mean(axis=0),
                             rtol=1e-5, atol=1e-6)
  assert summary["prior"] == {"kind": "fitted", "crystals": 12, "seed": 0,
                              "model_step": model.step}
  assert "fitting the fitted prior" in capsys.readouterr().out
  again = generation.sample(model, settings, tmp_path / "second")
  assert "restored from" in capsys.readouterr().out
  assert {key: again[key] for key in ("num_valid", "cov_recall")} == {
      key: summary[key] for key in ("num_valid", "cov_recall")}
  assert sorted(p.read_text() for p in (tmp_path / "first" / "cifs").glob("*.cif")) == sorted(
      p.read_text() for p in (tmp_path / "second" / "cifs").glob("*.cif"))
  assert recipes.get_config("repeat").sample.prior == "learned"
  settings.prior = "uniform"
  with pytest.raises(ValueError, match="sample.prior"):
    generation.sample(model, settings, tmp_path)


@pytest.mark.slow
def test_sample_mode_from_the_command_line(workdir, tfds_dir):
  overrides = [f"--config.dataset.data_dir={tfds_dir}", "--config.sample.num=6",
               "--config.sample.batch_size=4", "--config.sample.num_train_structures=12",
               "--config.sample.gallery=4", "--config.sample.seed=3",
               "--config.sample.num_reference=5"]
  result = subprocess.run(
      [sys.executable, "-m", "crystal_vae.main", f"--workdir={workdir}", "--mode=sample",
       *overrides],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "valid_fraction" in result.stdout
  out_dir = workdir / "sample"
  summary = json.loads((out_dir / "summary.json").read_text())
  structures = _assert_accounted(out_dir / "cifs", 6)
  assert summary["num_samples"] == 6 and summary["num_valid"] == len(structures)
  assert summary["valid_fraction"] == len(structures) / 6
  assert summary["seed"] == 3 and summary["num_train_structures"] == 12
  assert summary["reference"] == "validation (5)"
  # No prior flag: the learned prior, fitted once and kept in the workdir.
  assert summary["prior"]["kind"] == "learned"
  saved_prior = json.loads((workdir / "latent_prior" / "prior.json").read_text())
  assert saved_prior["description"] == summary["prior"]
  assert 0 <= summary["cov_precision"] <= summary["valid_fraction"]
  # The median nearest-neighbour distance over every site of the 12 training crystals, and
  # CDVAE's validity of the samples (distinct sites >= 0.5 Å apart, volume >= 0.1 Å³; SMACT),
  # recomputed from the CIFs with the numpy distances.
  train = generation.training_crystals(small_config(tfds_dir), 12, 3)
  nearest = np.concatenate([_periodic_distances(c.to_structure()).min(axis=1) for c in train])
  assert summary["nearest_neighbour_median_train"] == pytest.approx(np.median(nearest), rel=1e-6)
  apart = [len(s) == 1 or np.min(_periodic_distances(s)[~np.eye(len(s), dtype=bool)]) >= 0.5
           for s in structures]
  structure_ok = [ok and s.volume >= 0.1 for ok, s in zip(apart, structures)]
  composition_ok = [metrics.smact_valid(s.atomic_numbers) for s in structures]
  assert summary["cdvae_structure_valid"] == sum(structure_ok) / 6
  assert summary["cdvae_composition_valid"] == sum(composition_ok) / 6
  assert summary["cdvae_valid"] <= sum(np.logical_and(structure_ok, composition_ok)) / 6
  with np.load(out_dir / "reference_fingerprints.npz") as cache:
    assert cache["structure"].shape == (5, generation_metrics.STRUCTURE_FINGERPRINT_SIZE)
  assert _is_png(out_dir / "gallery.png") and _is_png(out_dir / "nearest_neighbours.png")


def test_a_config_of_another_model_is_refused(workdir):
  """(On the command line the error is one line: `ConfigMismatch` is one of main's one-line
  errors, test_main.py.)"""
  for variant, differences in (("repeat", "grid"), ("unit_cell", "representation, grid")):
    config = recipes.get_config(variant, "quick")
    with pytest.raises(inference.ConfigMismatch) as error:
      modes.run("sample", config, workdir)
    assert f"(different {differences}; it holds a repeat model)" in str(error.value)


def test_modes_take_the_dataset_from_the_checkpoint_unless_given(workdir, tfds_dir, tmp_path):
  config = small_config(tfds_dir)
  config.dataset.name = "cif_dir"
  config.dataset.path = str(tmp_path)  # what a --config file could hold for another run
  config.sample.num = 2
  model = inference.TrainedModel.for_mode(config, workdir, dataset_given=False)
  assert model.config.dataset.name == "prototypes" and model.config.dataset.path == ""
  assert model.config.sample.num == 6  # the checkpoint's config; the mode gets config.sample
  given = inference.TrainedModel.for_mode(config, workdir, dataset_given=True)
  assert given.config.dataset.name == "cif_dir" and given.config.dataset.path == str(tmp_path)


def test_interpolation_endpoints_are_the_inputs_reconstructions(model, tfds_dir):
  source = datasets.load_data_sources(tiny_config(tfds_dir).dataset)["train"]
  start, end = (datasets.record_to_crystal(source[i]) for i in (0, 1))
  paths = generation.interpolation(model, start, end, steps=4)
  mean, _ = model.encode(model.voxelize([start, end])["density"])
  reference = model.decode(mean)
  for method, (grids, rebuilt) in paths.items():
    assert grids["density"].shape[0] == 4 and len(rebuilt) == 4, method
    # Equal up to float rounding: the path is decoded in other batches than the reference.
    np.testing.assert_allclose(grids["density"][[0, -1]], reference["density"], rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_array_equal(grids["species"][[0, -1]], reference["species"])
  assert not np.array_equal(paths["linear"][0]["density"][1], paths["slerp"][0]["density"][1])


@pytest.mark.slow
def test_interpolate_mode_writes_cifs_panel_and_gif(workdir, tfds_dir):
  config = small_config(tfds_dir)
  source = datasets.load_data_sources(config.dataset)["validation"]
  config.interpolate.start = datasets.record_to_crystal(source[0]).id  # a dataset id
  cif = workdir / "end.cif"
  cif.write_text(writing.to_cif(_rock_salt()))
  config.interpolate.end = str(cif)  # a CIF file
  results = modes.run("interpolate", config, str(workdir))
  out_dir = workdir / "interpolate"
  assert results["start"] == config.interpolate.start and results["end"] == "end"
  for method in generation.METHODS:
    _assert_accounted(out_dir / method / "cifs", 3)
    assert len(results[method]["formulas"]) == 3
  assert _is_png(out_dir / "panel.png")
  with Image.open(out_dir / "interpolation.gif") as gif:
    assert gif.n_frames == 3


@pytest.mark.slow
def test_traverse_mode_writes_a_panel(workdir, tfds_dir):
  config = small_config(tfds_dir)
  config.traverse.dim = 5
  results = modes.run("traverse", config, str(workdir))
  assert results["values"] == [-3.0, 0.0, 3.0] and results["dim"] == 5
  assert _is_png(workdir / "traverse" / "traverse.png")
  # The first training crystal's latent mean with z[5] set to each value, decoded here.
  crystal = datasets.record_to_crystal(datasets.split_source(config.dataset, "train")[0])
  model = inference.TrainedModel.restore(workdir)
  mean, _ = model.encode(model.voxelize([crystal])["density"])
  assert results["crystal"] == crystal.id
  assert results["encoded_value"] == pytest.approx(float(mean[0, 5]), rel=1e-5)
  path = np.repeat(np.asarray(mean), 3, axis=0)
  path[:, 5] = [-3.0, 0.0, 3.0]
  density = np.stack([model.decode(z[None])["density"][0] for z in path]).reshape(3, -1)
  np.testing.assert_allclose(results["max_density"], density.max(axis=1), rtol=1e-5)
  np.testing.assert_allclose(results["mean_abs_change_from_first"],
                             np.abs(density - density[0]).mean(axis=1), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_conditional_generation_follows_the_target(tmp_path_factory, tfds_dir, model):
  workdir = trained_checkpoint(tmp_path_factory, tfds_dir, conditional_model=True)
  config = small_config(tfds_dir, conditional_model=True)
  results = modes.run("conditional", config, str(workdir))
  means = np.array(results["max_density_mean"])
  assert results["targets"] == [0.5, 1.0, 2.0, 4.0]
  assert np.all(np.diff(means) > 0), means
  # The decoder's bottleneck is multiplied by the target: each latent's maximum follows it.
  assert results["pearson_target_vs_max_per_latent"] > 0.9
  assert results["pearson_target_vs_max"] > 0.5
  geometry = results["geometry"]
  reference = geometry["reference_target_index"]
  assert reference == 2
  assert geometry["normalised_density_correlation"][reference] == pytest.approx(1.0)
  assert geometry["mean_abs_atom_count_change"][reference] == 0.0
  assert _is_png(workdir / "conditional" / "conditional.png")
  # The saved means, recomputed: the same draws decoded at each target, one at a time.
  saved = json.loads((workdir / "conditional" / "summary.json").read_text())
  # The draws are the model's learned prior's (fitted once, saved in the workdir with the
  # checkpoint's sample settings, as --mode=sample uses it).
  assert saved["prior"] == "learned"
  conditional_model = inference.TrainedModel.restore(workdir)
  recorded = json.loads((workdir / "latent_prior" / "prior.json").read_text())["description"]
  assert recorded["kind"] == "learned" and recorded["model_step"] == conditional_model.step
  prior = latent_prior.load(workdir / "latent_prior", recorded)
  z = prior.sample(4, config.conditional.seed)
  targets = np.array(config.conditional.targets)
  maxima = np.array([[conditional_model.decode(z[i:i + 1], np.array([target], np.float32))[
      "density"].max() for i in range(4)] for target in targets])  # (targets, latents)
  np.testing.assert_allclose(saved["max_density_mean"], maxima.mean(axis=1), rtol=1e-5)
  # Pearson's r over all (target, maximum) pairs, and the mean over latents of each latent's r
  # across the targets.
  assert saved["pearson_target_vs_max"] == pytest.approx(
      _pearson(np.repeat(targets, 4), maxima.ravel()), rel=1e-4)
  assert saved["pearson_target_vs_max_per_latent"] == pytest.approx(
      np.mean([_pearson(targets, column) for column in maxima.T]), rel=1e-4)
  with pytest.raises(ValueError, match="not conditional"):
    conditional.decode_at_targets(model, np.zeros((1, 8), np.float32), np.ones(1))
  # The paper's N(0, I) draws on request.
  config.conditional.prior = "standard"
  standard = modes.run("conditional", config, str(workdir))
  z = latent_prior.GaussianPrior.standard(8).sample(4, config.conditional.seed)
  first = conditional_model.decode(z, np.full(4, targets[0], np.float32))["density"]
  np.testing.assert_allclose(standard["max_density_mean"][0],
                             first.reshape(4, -1).max(axis=1).mean(), rtol=1e-5)


@pytest.mark.slow
def test_a_mode_without_config_uses_the_checkpoints_own(workdir, tmp_path):
  """`--workdir=W --mode=sample` alone: the config (dataset, sample settings) saved with W's
  checkpoint is used; a workdir without a checkpoint is refused in one line."""
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("sample", "interpolate"))
  # `--config.*` overrides without --config apply to the saved config: the number of draws is
  # the flag's, the number of training crystals compared with them the saved config's (12; the
  # default is 500).
  overridden = subprocess.run(
      [sys.executable, "-m", "crystal_vae.main", f"--workdir={copy}", "--mode=sample",
       "--config.sample.num=3"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300, check=False)
  assert overridden.returncode == 0, overridden.stderr[-3000:]
  summary = json.loads((copy / "sample" / "summary.json").read_text())
  assert summary["num_samples"] == 3 and summary["num_train_structures"] == 12
  empty = subprocess.run(
      [sys.executable, "-m", "crystal_vae.main", f"--workdir={tmp_path / 'empty'}",
       "--mode=sample"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=120, check=False)
  assert empty.returncode != 0
  assert "--config is needed" in empty.stderr and "Traceback" not in empty.stderr
