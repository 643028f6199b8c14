"""The property head (trained jointly, evaluated against the training-mean baseline) and
property-guided generation (`--mode=optimize`)."""

import csv
import json
import pathlib
import shutil
import subprocess
import sys
import types

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Structure

from conftest import prototypes, tiny_config, trained_checkpoint
from crystal_vae import crystals
from crystal_vae import generation
from crystal_vae import head_fit
from crystal_vae import inference
from crystal_vae import latent_prior
from crystal_vae import losses
from crystal_vae import metrics
from crystal_vae import models
from crystal_vae import modes
from crystal_vae import optimize
from crystal_vae import train


def test_property_mse_by_hand():
  predicted = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  target = jnp.array([[2.0, 6.0], [np.nan, np.nan]])
  # Example 0: ((1 - 2) / 1)² and ((2 - 6) / 2)², averaged; example 1 has no value: 0.
  np.testing.assert_allclose(losses.property_mse(predicted, target, (1.0, 2.0)), [2.5, 0.0])


def test_property_metrics_by_hand():
  true = np.array([[1.0], [2.0], [3.0], [np.nan]])
  predicted = np.array([[1.5], [2.0], [2.5], [9.0]])
  result = metrics.property_metrics(predicted, true, ["p"], training_means=[2.5])["p"]
  assert result["count"] == 3
  assert result["mae"] == pytest.approx(1 / 3)
  assert result["r2"] == pytest.approx(1 - 0.5 / 2.0)  # SS_res 0.5, SS_tot 2
  assert result["baseline_mae"] == pytest.approx((1.5 + 0.5 + 0.5) / 3)
  assert result["baseline_r2"] == pytest.approx(1 - (2.25 + 0.25 + 0.25) / 2.0)


def test_success_rates_count_starts_without_a_valid_crystal_as_misses():
  training = np.arange(100.0)  # percentiles 5, 10, 15 = 4.95, 9.9, 14.85
  best = np.array([3.0, 9.0, 14.0, np.nan])
  rates = optimize.success_rates(best, training, "minimize")
  assert (rates["sr5"], rates["sr10"], rates["sr15"]) == (0.25, 0.5, 0.75)
  rates = optimize.success_rates(np.array([99.0, 80.0]), training, "maximize")
  assert (rates["sr5"], rates["sr15"]) == (0.5, 0.5)


def _write_csv(path: pathlib.Path, rows) -> None:
  with open(path, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=["material_id", "cif", "mean_z", "sparse"])
    writer.writeheader()
    for index, crystal in enumerate(rows):
      writer.writerow({"material_id": crystal.id, "cif": crystal.to_structure().to(fmt="cif"),
                       "mean_z": float(np.mean(crystal.atomic_numbers)),
                       "sparse": 1.0 if index % 3 == 0 else ""})


def _train_property_model(root: pathlib.Path, seed: int) -> pathlib.Path:
  """A tiny model whose head predicts each crystal's mean atomic number (a function of the
  structure the density shows), trained on 32 small prototypes from `seed`."""
  chosen = [c for c in prototypes() if c.num_atoms <= 8][:40]
  (root / "csv").mkdir()
  _write_csv(root / "csv" / "train.csv", chosen[:32])
  _write_csv(root / "csv" / "val.csv", chosen[32:])
  config = tiny_config(str(root / "tfds"))
  config.dataset.name = "csv"
  config.dataset.path = str(root / "csv")
  config.model.properties = ("mean_z", "sparse")
  config.model.lattice_head = False  # the property head alone reads the 8-d latent
  config.learning_rate = 3e-3
  config.num_train_steps = 80
  config.log_every_steps = 40
  config.checkpoint_every_steps = 80
  config.eval_every_steps = 80
  config.seed = seed
  train.train_and_evaluate(config, str(root / f"workdir_{seed}"))
  return root / f"workdir_{seed}"


@pytest.fixture(scope="module")
def property_workdir(tmp_path_factory) -> pathlib.Path:
  return _train_property_model(tmp_path_factory.mktemp("properties"), seed=0)


@pytest.fixture(scope="module")
def judge_workdir(tmp_path_factory) -> pathlib.Path:
  """The same recipe trained from another seed: it shares no weights with `property_workdir`."""
  return _train_property_model(tmp_path_factory.mktemp("judge"), seed=1)


@pytest.mark.slow
def test_property_scaling_is_the_training_splits(property_workdir):
  model = inference.TrainedModel.restore(property_workdir)
  chosen = generation.split_crystals(model.config, "train", -1)
  mean_z = [np.mean(c.atomic_numbers) for c in chosen]
  np.testing.assert_allclose(model.config.model.property_means, [np.mean(mean_z), 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(model.config.model.property_stds[0], np.std(mean_z), rtol=1e-6)
  assert model.config.model.property_stds[1] == 1.0  # constant column: no scaling by 0


def test_the_head_learns_a_function_of_the_structure(property_workdir):
  model = inference.TrainedModel.restore(property_workdir)
  chosen = generation.split_crystals(model.config, "train", -1)
  z, _ = model.encode_crystals(chosen)
  predicted = model.predict_properties(z)[:, 0]
  true = np.array([np.mean(c.atomic_numbers) for c in chosen])
  r2 = 1 - np.sum((predicted - true) ** 2) / np.sum((true - true.mean()) ** 2)
  assert r2 > 0.3, r2  # the training mean scores 0


@pytest.mark.slow
def test_evaluate_reports_the_properties_beside_the_baseline(property_workdir):
  config = inference.TrainedModel.restore(property_workdir).config
  config.eval.num_batches = 1
  results = modes.run("evaluate", config, property_workdir)
  out_dir = property_workdir / "eval" / "validation"
  saved = json.loads((out_dir / "metrics.json").read_text())
  assert saved["properties"]["mean_z"]["count"] == 8
  assert saved["properties"]["sparse"]["count"] == 3  # rows without a value are left out
  assert results["properties"]["mean_z"]["baseline_mae"] > 0
  assert (out_dir / "properties.png").read_bytes()[:4] == b"\x89PNG"


def test_latent_optimisation_moves_the_prediction_monotonically(property_workdir):
  model = inference.TrainedModel.restore(property_workdir)
  z = latent_prior.GaussianPrior.standard(model.config.model.latent_dim).sample(4, seed=1)
  for direction, sign in (("maximize", 1), ("minimize", -1)):
    _, predictions = optimize.optimise_latents(model, z, 0, direction=direction, steps=20,
                                               learning_rate=0.01, prior_weight=0.0)
    steps = sign * np.diff(predictions, axis=0)
    assert (steps > -1e-5).all(), steps.min()
    assert (sign * (predictions[-1] - predictions[0]) > 0).all()


def test_the_head_stops_pushing_past_the_training_range(property_workdir):
  """With a bound halfway along a latent's free path, the latent stops at the first step past
  it: below where it would have gone, and still from then on."""
  model = inference.TrainedModel.restore(property_workdir)
  starts = latent_prior.GaussianPrior.standard(model.config.model.latent_dim).sample(3, seed=1)
  for z in starts:
    _, free = optimize.optimise_latents(model, z[None], 0, direction="maximize", steps=30,
                                        learning_rate=0.01, prior_weight=0.0)
    bound = float(free[0, 0] + 0.5 * (free[-1, 0] - free[0, 0]))
    path, bounded = optimize.optimise_latents(model, z[None], 0, direction="maximize",
                                              steps=30, learning_rate=0.01, prior_weight=0.0,
                                              bounds=(-np.inf, bound))
    crossed = int(np.argmax(bounded[:, 0] >= bound))
    assert 0 < crossed < 30 and bound <= bounded[-1, 0] < free[-1, 0]
    np.testing.assert_array_equal(path[crossed:], np.repeat(path[crossed:crossed + 1],
                                                            31 - crossed, axis=0))
    np.testing.assert_array_equal(bounded[:crossed + 1], free[:crossed + 1])


def test_a_judge_that_is_or_shares_the_optimised_model_is_refused(property_workdir, tmp_path):
  model = inference.TrainedModel.restore(property_workdir)
  with pytest.raises(inference.SettingsError, match="needs an independent judge"):
    optimize.independent_judge(model, "")
  with pytest.raises(inference.SettingsError, match="is the optimised model itself"):
    optimize.independent_judge(model, str(property_workdir))
  copy = tmp_path / "copy"
  shutil.copytree(property_workdir, copy)  # same weights under another name
  with pytest.raises(inference.SettingsError, match=r"shares \d+ weight arrays"):
    optimize.independent_judge(model, str(copy))
  config = model.config
  config.optimize.judge = ""
  with pytest.raises(inference.SettingsError, match="needs an independent judge"):
    modes.run("optimize", config, property_workdir)


@pytest.mark.slow
def test_optimize_mode_writes_crystals_figure_and_success_rates(property_workdir,
                                                                 judge_workdir):
  config = inference.TrainedModel.restore(property_workdir).config
  config.optimize.method = "gradient"
  config.optimize.num = 3
  config.optimize.steps = 6
  config.optimize.num_saved = 2
  config.optimize.judge = str(judge_workdir)
  results = modes.run("optimize", config, property_workdir)
  out_dir = property_workdir / "optimize"
  assert results["saved_steps"] == [3, 6] and results["property"] == "mean_z"
  assert 0 <= results["sr5"] <= results["sr10"] <= results["sr15"] <= 1
  for step in (3, 6):
    written = list((out_dir / "cifs" / f"step_{step:04d}").glob("*.cif"))
    with open(out_dir / "cifs" / f"step_{step:04d}" / "invalid.csv") as handle:
      assert len(written) + len(handle.readlines()) - 1 == 3
  assert (out_dir / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((out_dir / "summary.json").read_text())["judge"] == str(judge_workdir)


def _gaussian_prior(config) -> None:
  config.sample.prior = "fitted"  # a Gaussian of the training latents, fitted in a second
  config.sample.prior_crystals = -1


def test_screening_keeps_the_draws_the_head_ranks_best_within_the_training_range(
    property_workdir):
  model = inference.TrainedModel.restore(property_workdir)
  _gaussian_prior(model.config)
  prior, _ = generation.prior_of(model, model.config.sample)
  every = model.predict_properties(prior.sample(64, 3))[:, 0]
  bounds = (float(np.percentile(every, 10)), float(np.percentile(every, 90)))
  for direction in ("minimize", "maximize"):
    z, predicted = optimize.ranked_draws(model, 64, 5, 3, 0, direction, bounds)
    inside = every[(every >= bounds[0]) & (every <= bounds[1])]
    expected = np.sort(inside)[:5] if direction == "minimize" else np.sort(inside)[::-1][:5]
    np.testing.assert_allclose(predicted, expected, rtol=1e-6)
    np.testing.assert_allclose(model.predict_properties(z)[:, 0], predicted, rtol=1e-5)


def test_an_unknown_optimisation_method_is_refused_in_one_line(property_workdir):
  config = inference.TrainedModel.restore(property_workdir).config
  config.optimize.method = "anneal"
  with pytest.raises(inference.SettingsError, match=r"^optimize.method 'anneal' not in"):
    modes.run("optimize", config, property_workdir)


@pytest.mark.slow
def test_optimize_by_screening_keeps_the_crystals_the_model_reads_best(property_workdir,
                                                                       judge_workdir):
  config = inference.TrainedModel.restore(property_workdir).config
  _gaussian_prior(config)
  config.optimize.update(method="screen", screen_draws=32, screen_rebuilt=8, num=3,
                         judge=str(judge_workdir))
  results = modes.run("optimize", config, property_workdir)
  out_dir = property_workdir / "optimize"
  written = sorted((out_dir / "cifs" / "screened").glob("rank_*.cif"))
  assert results["method"] == "screen" and results["rebuilt"] == 8
  assert len(written) == results["kept"] <= 3
  assert 0 <= results["sr5"] <= results["sr10"] <= results["sr15"] <= 1
  # Kept best first by the model's own reading of the written crystals.
  model = inference.TrainedModel.restore(property_workdir)
  read = optimize.read_properties(model, [Structure.from_file(p) for p in written], 0)
  assert np.all(np.diff(read) >= -1e-3), read
  assert (out_dir / "screening.png").read_bytes()[:4] == b"\x89PNG"


def test_a_model_without_a_property_head_cannot_optimise(tmp_path_factory, tfds_dir):
  model = inference.TrainedModel.restore(trained_checkpoint(tmp_path_factory, tfds_dir))
  with pytest.raises(ValueError, match="no property head"):
    optimize.property_index(model, "")


def test_property_values_of_records_and_crystals():
  crystal = crystals.Crystal(id="x", lattice=np.eye(3), frac_coords=np.zeros((1, 3)),
                             atomic_numbers=np.array([1]), properties={"a": 2.0})
  np.testing.assert_array_equal(crystals.property_values(crystal, ["a", "b"]), [2.0, np.nan])
  record = {"properties": b'{"b": 3.5}'}
  np.testing.assert_array_equal(crystals.property_values(record, ["a", "b"]), [np.nan, 3.5])


@pytest.mark.slow
def test_fit_head_learns_a_smooth_function_of_the_latent_and_masks_missing_values():
  """`head_fit.fit_head` of a property head on synthetic latents: a smooth function of z is
  learnt (held-out R² > 0.9, the mean scores 0); rows without a value (NaN) do not reach the
  fit."""
  rng = np.random.default_rng(0)
  means = rng.normal(size=(600, 4)).astype(np.float32)
  values = (2.0 * means[:, :1] + np.sin(2.0 * means[:, 1:2]) + 5.0).astype(np.float32)
  values[::7] = np.nan  # missing
  known = np.isfinite(values[:500, 0])
  scale = (float(values[:500][known].mean()),), (float(values[:500][known].std()),)
  logvars = np.full_like(means, -20.0)  # no posterior spread
  train_split = head_fit.EncodedSplit(means[:500], logvars[:500], values[:500])
  validation_split = head_fit.EncodedSplit(means[500:], logvars[500:], values[500:])
  head = models.PropertyHead((128, 128), *scale)

  def loss(predicted, target):
    return losses.property_mse(predicted, target, scale[1])

  params, curve = head_fit.fit_head(head, loss, train_split, validation_split, steps=600,
                                    learning_rate=3e-3, batch_size=128, seed=0)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
  predicted = np.asarray(head.apply({"params": params}, means[500:]))
  result = metrics.property_metrics(predicted, values[500:], ["p"], scale[0])
  assert result["p"]["r2"] > 0.9, result
  assert result["p"]["count"] == np.isfinite(values[500:, 0]).sum()
  assert curve[-1]["train"] < curve[0]["train"]


@pytest.fixture(scope="module")
def headless_workdir(property_workdir) -> pathlib.Path:
  """A tiny model trained on the same crystals without a property head."""
  config = inference.TrainedModel.restore(property_workdir).config
  config.model.properties = ()
  config.model.property_means = config.model.property_stds = ()
  config.num_train_steps = config.checkpoint_every_steps = 4
  config.eval.split = "none"
  workdir = property_workdir.parent / "headless"
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.mark.slow
def test_fit_property_head_adds_or_replaces_a_head_of_a_frozen_model(headless_workdir):
  out = headless_workdir.parent / "headless_mean_z"
  summary = head_fit.fit_property_head(headless_workdir, out, ["mean_z"], steps=300,
                                           learning_rate=3e-3, batch_size=16)
  source = inference.TrainedModel.restore(headless_workdir)
  fitted = inference.TrainedModel.restore(out)
  # The head's scaling is the training split's (numpy over the crystals' own atoms).
  chosen = generation.split_crystals(source.config, "train", -1)
  mean_z = np.array([np.mean(c.atomic_numbers) for c in chosen])
  assert tuple(fitted.config.model.properties) == ("mean_z",)
  np.testing.assert_allclose(fitted.config.model.property_means, [mean_z.mean()], rtol=1e-6)
  np.testing.assert_allclose(fitted.config.model.property_stds, [mean_z.std()], rtol=1e-6)
  # Everything but the head is the source's, unchanged.
  before = traverse_util.flatten_dict(source.variables["params"])
  after = traverse_util.flatten_dict(fitted.variables["params"])
  assert {path for path in after if path[0] == "property"}
  assert set(before) == {path for path in after if path[0] != "property"}
  for path, value in before.items():
    np.testing.assert_array_equal(after[path], value)
  # The written workdir predicts what the summary reports, and beats the training mean on the
  # crystals it was fitted to.
  validation = generation.split_crystals(source.config, "validation", -1)
  predicted = fitted.predict_properties(fitted.encode_crystals(validation)[0])[:, 0]
  true = np.array([np.mean(c.atomic_numbers) for c in validation])
  assert summary["properties"]["mean_z"]["mae"] == pytest.approx(
      np.mean(np.abs(predicted - true)), rel=1e-4)
  predicted = fitted.predict_properties(fitted.encode_crystals(chosen)[0])[:, 0]
  assert np.mean(np.abs(predicted - mean_z)) < np.mean(np.abs(mean_z - mean_z.mean()))
  with pytest.raises(FileExistsError):
    head_fit.fit_property_head(headless_workdir, out, ["mean_z"])
  # A head fitted again replaces the one there (here with the two properties).
  head_fit.fit_property_head(out, out.parent / "again", ["mean_z", "sparse"], steps=10)
  again = inference.TrainedModel.restore(out.parent / "again")
  assert tuple(again.config.model.properties) == ("mean_z", "sparse")
  z = np.zeros((1, again.config.model.latent_dim), np.float32)
  assert again.predict_properties(z).shape == (1, 2)


def test_property_distance_of_draws_is_the_wasserstein_distance(property_workdir):
  """d_E: the head's predictions for the draws that gave a crystal (here 3 of 4) against the
  reference crystals' values: for samples of equal size, the mean gap of the sorted values."""
  model = inference.TrainedModel.restore(property_workdir)
  z = latent_prior.GaussianPrior.standard(model.config.model.latent_dim).sample(4, seed=2)
  rebuilt = [types.SimpleNamespace(valid=valid) for valid in (True, False, True, True)]
  reference = [crystals.Crystal(id=str(i), lattice=np.eye(3) * 4, frac_coords=np.zeros((1, 3)),
                                atomic_numbers=np.array([11]), properties={"mean_z": value})
               for i, value in enumerate((3.0, 9.0, 14.0))]
  predicted = np.sort(model.predict_properties(z[[0, 2, 3]])[:, 0])
  expected = np.mean(np.abs(predicted - np.array([3.0, 9.0, 14.0])))
  distances = generation.property_distances(model, z, rebuilt, reference)
  assert distances["wasserstein_mean_z"] == pytest.approx(expected, rel=1e-6)
  assert "wasserstein_sparse" not in distances  # no reference crystal has a value


@pytest.mark.slow
def test_the_judges_ceiling_reads_the_validation_crystals_in_the_best_percent(property_workdir,
                                                                               judge_workdir):
  config = inference.TrainedModel.restore(property_workdir).config
  training = [np.mean(c.atomic_numbers) for c in generation.split_crystals(config, "train", -1)]
  validation = [np.mean(c.atomic_numbers)
                for c in generation.split_crystals(config, "validation", -1)]
  expected = sum(value <= np.percentile(training, 50) for value in validation)
  assert expected > 0
  script = pathlib.Path(__file__).resolve().parents[1] / "launch" / "judge_ceiling.py"
  printed = subprocess.run(
      [sys.executable, str(script), f"--workdir={property_workdir}",
       f"--judge={judge_workdir}", "--property=mean_z", "--percent=50", "--num=100"],
      capture_output=True, text=True, check=True).stdout
  assert printed.startswith(f"{expected} validation crystals in the best 50% of mean_z")
  rates = [float(word) for word in printed.split("SR")[1:] for word in word.split()[1:2]]
  assert len(rates) == 3 and 0 <= rates[0] <= rates[1] <= rates[2] <= 1
