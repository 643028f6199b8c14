"""A composition head fitted on a trained model's frozen latent (`head_fit.py`; the property head's
fit is tested in test_properties.py)."""

import csv

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import prototypes, tiny_config, trained_checkpoint
from crystal_vae import generation
from crystal_vae import head_fit
from crystal_vae import inference
from crystal_vae import models
from crystal_vae import train


def test_composition_loss_and_exact_by_hand():
  counts = np.zeros((2, 4), np.float32)
  counts[0, [1, 3]] = [1, 3]   # Z=1 once, Z=3 three times: fractions 1/4, 3/4
  counts[1, 2] = 2             # Z=2 twice
  logits = np.log(np.array([[1e-9, 0.3, 1e-9, 0.7], [1e-9, 0.5, 0.5, 1e-9]], np.float32))
  # Cross-entropy -Σ f log p: -(1/4 log 0.3 + 3/4 log 0.7); -log 0.5.
  np.testing.assert_allclose(
      head_fit.composition_loss(jnp.asarray(logits), jnp.asarray(counts)),
      [-(0.25 * np.log(0.3) + 0.75 * np.log(0.7)), -np.log(0.5)], rtol=1e-5)
  # 4 x (0.3, 0.7) = (1.2, 2.8) rounds to (1, 3): exact; 2 x (0.5, 0.5) gives Z=1 and Z=2 once.
  assert head_fit.composition_exact(logits, counts) == 0.5


@pytest.mark.slow
def test_fit_head_reads_compositions_back_from_posterior_draws():
  """Synthetic latents: each of 6 compositions has its own direction in z, each crystal a mean
  scattered around it and a posterior spread. A head fitted on posterior draws with dropout
  gets the held-out compositions exact, and its loss falls to near its floor."""
  rng = np.random.default_rng(0)
  compositions = np.zeros((6, 11), np.float32)
  for index, (a, b, count_b) in enumerate([(1, 8, 3), (3, 9, 1), (5, 6, 2), (8, 10, 1),
                                           (2, 7, 4), (4, 5, 1)]):
    compositions[index, a], compositions[index, b] = 1, count_b
  centres = rng.normal(size=(6, 8)) * 2.0
  labels = rng.integers(0, 6, size=700)
  means = (centres[labels] + 0.3 * rng.normal(size=(700, 8))).astype(np.float32)
  logvars = np.full_like(means, 2 * np.log(0.3))
  train_split = head_fit.EncodedSplit(means[:600], logvars[:600], compositions[labels[:600]])
  validation_split = head_fit.EncodedSplit(means[600:], logvars[600:], compositions[labels[600:]])
  head = models.CompositionHead((64,), 10, dropout_rate=0.2)
  params, curve = head_fit.fit_head(head, head_fit.composition_loss, train_split,
                                    validation_split, steps=300, learning_rate=3e-3,
                                    batch_size=64, seed=0, posterior_noise=1.0)
  logits = head.apply({"params": params}, validation_split.means)
  assert head_fit.composition_exact(logits, validation_split.targets) > 0.95
  # The loss falls to near its floor, the targets' own entropy -Σ f log f.
  fractions = validation_split.targets / validation_split.targets.sum(axis=1, keepdims=True)
  entropy = np.mean(-np.sum(np.where(fractions > 0, fractions * np.log(fractions + 1e-30), 0),
                            axis=1))
  assert curve[-1]["validation"] < curve[0]["validation"]
  assert curve[-1]["validation"] < entropy + 0.05, (curve[-1], entropy)


@pytest.mark.slow
def test_composition_ensemble_is_the_mean_of_its_members_fractions():
  """An ensemble head's softmax is the mean of its members' softmaxes, each member the MLP a
  single head with that member's parameters computes (a numpy reference of the GELU MLP)."""
  head = models.CompositionHead((16, 8), 6, members=3)
  z = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  params = head.init(jax.random.key(0), jnp.asarray(z))["params"]
  fractions = np.exp(np.asarray(head.apply({"params": params}, z), np.float64))

  def gelu(x):  # flax's default: the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  members = []
  for index in range(3):
    layers = params["members"]
    x = z.astype(np.float64)
    for name in ("Dense_0", "Dense_1"):
      x = gelu(x @ np.asarray(layers[name]["kernel"][index])
               + np.asarray(layers[name]["bias"][index]))
    logits = x @ np.asarray(layers["Dense_2"]["kernel"][index]) + np.asarray(
        layers["Dense_2"]["bias"][index])
    members.append(np.exp(logits - logits.max(axis=1, keepdims=True)))
    members[-1] /= members[-1].sum(axis=1, keepdims=True)
  np.testing.assert_allclose(fractions, np.mean(members, axis=0), rtol=1e-4, atol=1e-6)
  # The members differ (each its own initialisation), so the mean is not any one of them.
  assert not np.allclose(members[0], members[1], atol=1e-3)
  # One member is a plain MLP, with the layout of a jointly trained head's parameters.
  single = models.CompositionHead((16, 8), 6).init(jax.random.key(0), jnp.asarray(z))["params"]
  assert set(single) == {"Dense_0", "Dense_1", "Dense_2"}


@pytest.fixture(scope="module")
def composition_workdir(tmp_path_factory):
  """A tiny model with a composition head, trained 4 steps on 16 small prototypes that form
  both its training and its validation split (so that a head fitted to the first is selected
  on the same crystals)."""
  root = tmp_path_factory.mktemp("composition")
  chosen = [c for c in prototypes() if c.num_atoms <= 8][:16]
  (root / "csv").mkdir()
  for name, suffix in (("train.csv", ""), ("val.csv", "-val")):  # one id per crystal and split
    with open(root / "csv" / name, "w", newline="") as handle:
      writer = csv.writer(handle)
      writer.writerow(["material_id", "cif"])
      writer.writerows([c.id + suffix, c.to_structure().to(fmt="cif")] for c in chosen)
  config = tiny_config(str(root / "tfds"))
  config.dataset.name = "csv"
  config.dataset.path = str(root / "csv")
  config.model.composition_head = True
  config.eval.split = "none"
  train.train_and_evaluate(config, str(root / "workdir"))
  return root / "workdir"


@pytest.mark.slow
def test_fit_composition_head_replaces_the_head_of_a_frozen_model(composition_workdir):
  out = composition_workdir.parent / "fitted"
  summary = head_fit.fit_composition_head(composition_workdir, out, hidden=(64,), steps=300,
                                          learning_rate=1e-2, batch_size=16, members=2,
                                          posterior_noise=0.0, dropout_rate=0.0)
  source = inference.TrainedModel.restore(composition_workdir)
  fitted = inference.TrainedModel.restore(out)
  assert tuple(fitted.config.model.composition_hidden) == (64,)
  assert fitted.config.model.composition_members == 2
  assert fitted.variables["params"]["composition"]["members"]["Dense_0"]["kernel"].shape[0] == 2
  assert len(summary["composition_exact_members"]) == 2
  # Everything but the head is the source's, unchanged.
  before = traverse_util.flatten_dict(source.variables["params"])
  after = traverse_util.flatten_dict(fitted.variables["params"])
  assert ({path for path in before if path[0] != "composition"}
          == {path for path in after if path[0] != "composition"})
  for path, value in before.items():
    if path[0] != "composition":
      np.testing.assert_array_equal(after[path], value)
  # The written workdir's head decodes what the summary reports (a numpy reference of the
  # rounded counts), and reads the crystals it was fitted to back better than the 4-step head.
  def exact(model, chosen):
    fractions = model.decode(model.encode_crystals(chosen)[0])["composition"]
    hits = []
    for predicted, crystal in zip(fractions, chosen):
      scaled = predicted[1:] / predicted[1:].sum() * crystal.num_atoms
      counts = np.floor(scaled).astype(int)
      left = crystal.num_atoms - counts.sum()
      counts[np.argsort(counts - scaled, kind="stable")[:left]] += 1
      hits.append(np.array_equal(counts, np.bincount(crystal.atomic_numbers,
                                                     minlength=len(predicted))[1:]))
    return np.mean(hits)

  validation = generation.split_crystals(source.config, "validation", -1)
  assert summary["composition_exact"] == pytest.approx(exact(fitted, validation))
  assert summary["composition_exact_before"] == pytest.approx(exact(source, validation))
  assert summary["composition_exact"] > max(summary["composition_exact_before"], 0.5)
  with pytest.raises(FileExistsError):
    head_fit.fit_composition_head(composition_workdir, out)


def test_fit_composition_head_needs_an_encoder_that_reads_the_composition(tmp_path_factory,
                                                                          tfds_dir):
  workdir = trained_checkpoint(tmp_path_factory, tfds_dir)
  with pytest.raises(ValueError, match="no composition head"):
    head_fit.fit_composition_head(workdir, workdir.parent / "never")
