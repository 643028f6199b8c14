"""Training: loss terms by hand, an end-to-end run, exact resume, NaN stop (several processes and
devices: test_distributed.py)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Lattice

from conftest import require_native
from conftest import tiny_config
from crystal_vae import adam
from crystal_vae import checkpoints
from crystal_vae import datasets
from crystal_vae.configs import recipes
from crystal_vae import evaluate
from crystal_vae import inference
from crystal_vae import input_pipeline
from crystal_vae import train
from crystal_vae.native import kernels


def _params(workdir) -> dict:
  """The parameters of the latest checkpoint, as numpy, restored as a user would."""
  return jax.device_get(inference.TrainedModel.restore(workdir).variables["params"])


def _assert_trees_close(a, b, **tolerance):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, **tolerance)


def test_lattice_loss_compares_with_the_lattice_rotated_like_the_atoms(tfds_dir):
  config = tiny_config(tfds_dir, "unit_cell")
  lattice = Lattice.from_parameters(3.1, 4.2, 5.3, 70.0, 95.0, 112.0).matrix
  rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
  zeros = np.zeros((1, 2, 2, 2), np.float32)
  outputs = {"recon": zeros, "mean": jnp.zeros((1, 2)), "logvar": jnp.zeros((1, 2)),
             "segmented": jnp.zeros((1, 2, 2, 2, 2)),
             "lattice": jnp.asarray((lattice @ rotation.T + 0.5)[None], jnp.float32)}
  batch = {"density": zeros, "species": zeros.astype(np.int32),
           "lattice": lattice[None].astype(np.float32), "rotation": rotation[None]}
  terms = train.voxel_losses(outputs, batch, config)
  # Every entry of the oriented lattice is off by 0.5 Å: MSE of (0.5 / box)².
  np.testing.assert_allclose(terms["lattice_mse"], [(0.5 / config.voxel.box) ** 2], rtol=1e-4)


def test_loss_terms_against_hand_computed_values(tfds_dir):
  config = tiny_config(tfds_dir)
  config.model.species_head = "classes"
  config.loss.balanced = False
  density = np.zeros((1, 2, 2, 2), np.float32)
  density[0, 0, 0, 0] = 2.0
  species = np.zeros((1, 2, 2, 2), np.int32)
  species[0, 0, 0, 0] = 3
  logits = np.zeros((1, 2, 2, 2, 4), np.float32)
  logits[0, 0, 0, 0, 3] = np.log(3.0)  # p(3) = 3 / 6 at the atom voxel, else uniform 1/4.
  outputs = {"recon": jnp.ones((1, 2, 2, 2)), "mean": jnp.array([[1.0, 0.0]]),
             "logvar": jnp.array([[0.0, np.log(2.0)]]), "segmented": jnp.asarray(logits)}
  terms = train.voxel_losses(outputs, {"density": density, "species": species}, config)
  np.testing.assert_allclose(terms["mse"], [(1.0 + 7 * 1.0) / 8], rtol=1e-6)
  # KL(N(μ,σ²)||N(0,1)) = ½(σ² + μ² − 1 − ln σ²): ½(1+1−1−0) + ½(2+0−1−ln 2).
  np.testing.assert_allclose(terms["kl"], [0.5 + 0.5 * (1.0 - np.log(2.0))], rtol=1e-6)
  np.testing.assert_allclose(terms["seg"], [(-np.log(0.5) + 7 * np.log(4.0)) / 8], rtol=1e-6)
  # argmax is class 3 at the atom voxel (right) and class 0 elsewhere (ties -> first: right).
  np.testing.assert_allclose(terms["voxel_accuracy"], [1.0])
  assert int(terms["atom_voxel_correct"][0]) == 1 and int(terms["atom_voxels"][0]) == 1
  loss = train.total_loss(terms, config)
  np.testing.assert_allclose(loss, terms["mse"][0] + config.loss.beta * terms["kl"][0]
                             + terms["seg"][0], rtol=1e-6)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, tfds_dir) -> pathlib.Path:
  """Four uninterrupted steps of the tiny model (checkpoints at 2 and 4)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  train.train_and_evaluate(tiny_config(tfds_dir), str(workdir))
  return workdir


@pytest.mark.slow
def test_end_to_end_run_writes_metrics_checkpoints_and_events(trained_workdir):
  records = [json.loads(line) for line in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == [2, 4]
  evals = [r for r in records if r["split"] == "validation"]
  assert len(evals) == 1 and evals[0]["step"] == 4
  for key in ("mse", "kl", "seg", "voxel_accuracy", "atom_voxel_accuracy", "atom_voxel_recall",
              "loss_vae"):
    assert np.isfinite(evals[0][key])
  assert 0.0 <= evals[0]["voxel_accuracy"] <= 1.0
  manager = checkpoints.checkpoint_manager(trained_workdir, read_only=True)
  assert manager.all_steps() == [2, 4]
  assert list((trained_workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert checkpoints.restore_config(manager).model.decoder_paddings == ("SAME", "SAME", "SAME")


def test_a_finished_run_run_again_changes_nothing(trained_workdir, tfds_dir, tmp_path):
  workdir = tmp_path / "finished"
  shutil.copytree(trained_workdir, workdir)
  before = {path.relative_to(workdir): path.read_bytes() for path in workdir.rglob("*")
            if path.is_file() and path.suffix != ".png"}
  train.train_and_evaluate(tiny_config(tfds_dir), str(workdir))
  after = {path.relative_to(workdir): path.read_bytes() for path in workdir.rglob("*")
           if path.is_file() and path.suffix != ".png"}
  assert after == before  # no new TensorBoard file, metrics or checkpoint


@pytest.mark.slow
def test_resume_after_a_crash_equals_the_uninterrupted_run(trained_workdir, tfds_dir, tmp_path,
                                                           monkeypatch):
  real_batches = input_pipeline.train_batches

  def crashing_batches(*args, **kwargs):
    for count, batch in enumerate(real_batches(*args, **kwargs)):
      if kwargs["start_step"] + count == 3:  # dies while computing step 4, after checkpoint 2
        raise KeyboardInterrupt("simulated kill")
      yield batch

  monkeypatch.setattr(input_pipeline, "train_batches", crashing_batches)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config(tfds_dir), str(tmp_path))
  assert checkpoints.checkpoint_manager(tmp_path, read_only=True).all_steps() == [2]
  monkeypatch.setattr(input_pipeline, "train_batches", real_batches)
  train.train_and_evaluate(tiny_config(tfds_dir), str(tmp_path))
  _assert_trees_close(_params(tmp_path), _params(trained_workdir), rtol=0, atol=0)
  # The log holds each step once, as the uninterrupted run's does.
  steps = [(r["step"], r["split"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").open())]
  assert steps == [(r["step"], r["split"])
                   for r in map(json.loads, (trained_workdir / "metrics.jsonl").open())]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tfds_dir, tmp_path, monkeypatch):
  real_voxelized = train.Trainer.voxelized
  calls = []

  def poisoned_voxelized(self, local_batch, key, **kwargs):
    batch = real_voxelized(self, local_batch, key, **kwargs)
    if kwargs["train"]:
      calls.append(1)
      if len(calls) == 3:  # step 3: a non-finite density reaches the model
        batch = dict(batch, density=batch["density"] * np.nan)
    return batch

  monkeypatch.setattr(train.Trainer, "voxelized", poisoned_voxelized)
  with pytest.raises(FloatingPointError, match="step 3"):
    train.train_and_evaluate(tiny_config(tfds_dir), str(tmp_path))
  assert checkpoints.checkpoint_manager(tmp_path, read_only=True).all_steps() == [2]
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(_params(tmp_path)))


def test_warmup_cosine_learning_rate_against_hand_computed_values(tfds_dir):
  config = tiny_config(tfds_dir)
  config.learning_rate, config.num_train_steps = 2e-3, 110
  config.lr_schedule, config.warmup_steps, config.final_learning_rate_fraction = (
      "warmup_cosine", 10, 0.05)
  schedule = adam.learning_rate_schedule(config)
  final = 2e-3 * 0.05
  # Linear warm-up from 0, then final + (peak - final) (1 + cos(π t / 100)) / 2.
  for step, expected in [(0, 0.0), (5, 1e-3), (10, 2e-3), (60, final + (2e-3 - final) / 2),
                         (110, final)]:
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-9)
  config.lr_schedule = "constant"
  np.testing.assert_allclose(adam.learning_rate_schedule(config)(50), 2e-3)
  config.lr_schedule = "step"
  with pytest.raises(ValueError, match="lr_schedule"):
    adam.learning_rate_schedule(config)


@pytest.mark.slow
def test_teacher_forcing_adds_the_weighted_loss_on_the_true_density(tfds_dir):
  config = tiny_config(tfds_dir)
  config.loss.teacher_forcing = 0.5
  config.model.lattice_head = False  # the batch below has no lattice
  state = train.create_train_state(config, jax.random.key(0))
  grid = config.voxel.grid
  rng = np.random.default_rng(0)
  batch = {"density": jnp.asarray(rng.exponential(size=(2, grid, grid, grid)), jnp.float32),
           "species": jnp.asarray(rng.integers(0, 3, (2, grid, grid, grid)) * 8, jnp.int32)}
  outputs = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                           batch["density"], jax.random.key(1), train=False, teacher_forcing=True)
  terms = train.voxel_losses(outputs, batch, config)
  assert terms["seg_true"].shape == (2,) and np.all(terms["seg_true"] > 0)
  np.testing.assert_allclose(
      train.total_loss(terms, config),
      np.mean(terms["mse"] + config.loss.beta * terms["kl"] + terms["seg"]
              + 0.5 * terms["seg_true"]), rtol=1e-6)


@pytest.mark.slow
def test_export_keeps_the_model_and_drops_the_adam_moments(trained_workdir, tmp_path):
  out = tmp_path / "pretrained"
  repo = pathlib.Path(__file__).parent.parent
  result = subprocess.run(
      [sys.executable, str(repo / "launch" / "export_pretrained.py"),
       f"--workdir={trained_workdir}", f"--out={out}"],
      cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_trees_close(_params(out), _params(trained_workdir), rtol=0, atol=0)
  manager = checkpoints.checkpoint_manager(out, read_only=True)
  config = checkpoints.restore_config(manager)
  abstract = jax.eval_shape(lambda: train.create_train_state(config, jax.random.key(0)))
  _, state = checkpoints.restore_state(manager, abstract)
  assert int(state.step) == 4 and manager.all_steps() == [4]
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(state.opt_state))
  trained = checkpoints.restore_config(checkpoints.checkpoint_manager(trained_workdir,
                                                                      read_only=True))
  assert trained.dataset.data_dir  # the tests' own TFDS directory ...
  assert (config.dataset.path, config.dataset.data_dir) == ("", "")  # ... named by no export
  assert (out / "metrics.jsonl").read_text() == (trained_workdir / "metrics.jsonl").read_text()
  assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_export_with_a_config_of_another_model_is_refused(trained_workdir, tmp_path):
  repo = pathlib.Path(__file__).parent.parent
  result = subprocess.run(
      [sys.executable, str(repo / "launch" / "export_pretrained.py"),
       f"--workdir={trained_workdir}", f"--out={tmp_path / 'out'}",
       "--config=configs/repeat.py:quick"],
      cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode != 0
  assert "builds a different model" in result.stderr


def test_a_config_saved_before_a_field_existed_restores_with_its_default(tmp_path):
  config = recipes.get_config("repeat", "cpu")
  config.loss.beta = 1e-5
  del config.eval["atoms_from"]  # as saved by an older version
  manager = checkpoints.checkpoint_manager(tmp_path)
  checkpoints.save(manager, 3, {"weights": np.zeros(2, np.float32)}, config)
  manager.wait_until_finished()
  restored = checkpoints.restore_config(checkpoints.checkpoint_manager(tmp_path, read_only=True))
  assert restored.eval.atoms_from == recipes.get_config("repeat").eval.atoms_from
  assert restored.loss.beta == 1e-5 and restored.eval.min_site_z == config.eval.min_site_z
  assert restored.model.decoder_kernels == config.model.decoder_kernels


def test_site_z_loss_is_added_with_its_weight(tfds_dir):
  config = tiny_config(tfds_dir)
  config.loss.site_z_weight = 0.5
  grid, box = 4, config.voxel.box
  h = box / grid
  centres = (np.arange(grid) + 0.5) * h
  sq = (centres[:, None, None] - centres[1]) ** 2 + (centres[None, :, None] - centres[1]) ** 2 \
      + (centres[None, None, :] - centres[1]) ** 2
  gaussian = np.exp(-sq / 2) / (2 * np.pi) ** 1.5  # σ = 1 Å, an atom at voxel (1, 1, 1)
  species = np.zeros((1, grid, grid, grid), np.int32)
  species[0, 1, 1, 1] = 8
  outputs = {"recon": jnp.asarray(10.0 * gaussian[None], jnp.float32),
             "mean": jnp.zeros((1, 2)), "logvar": jnp.zeros((1, 2)),
             "segmented": jnp.zeros((1, grid, grid, grid, 2))}
  batch = {"density": (8.0 * gaussian[None]).astype(np.float32), "species": species}
  config.voxel.sigma = 1.0
  terms = train.voxel_losses(outputs, batch, config)
  # Z decoded 2 too high at the one atom voxel: squared error 4, and 2 > 0.5 is not right.
  np.testing.assert_allclose(terms["site_z_mse"], [4.0], rtol=1e-4)
  assert terms["site_z_right"][0] == 0.0
  np.testing.assert_allclose(
      train.total_loss(terms, config),
      terms["mse"][0] + config.loss.beta * terms["kl"][0] + terms["seg"][0]
      + 0.5 * terms["site_z_mse"][0], rtol=1e-6)


def test_composition_loss_is_added_with_its_weight(tfds_dir):
  config = tiny_config(tfds_dir)
  config.model.composition_head = True
  config.loss.composition_weight = 0.25
  zeros = np.zeros((1, 2, 2, 2), np.float32)
  logits = np.zeros((1, config.dataset.max_z + 1), np.float32)
  outputs = {"recon": jnp.asarray(zeros), "mean": jnp.zeros((1, 2)), "logvar": jnp.zeros((1, 2)),
             "segmented": jnp.zeros((1, 2, 2, 2, 2)), "composition": jnp.asarray(logits)}
  batch = {"density": zeros, "species": zeros.astype(np.int32),
           "atomic_numbers": np.array([[26, 8, 0]]), "atom_mask": np.array([[True, True, False]])}
  terms = train.voxel_losses(outputs, batch, config)
  # Uniform logits: cross-entropy log(max_z + 1) whatever the target fractions.
  np.testing.assert_allclose(terms["composition_ce"], [np.log(config.dataset.max_z + 1)],
                             rtol=1e-6)
  np.testing.assert_allclose(
      train.total_loss(terms, config),
      terms["mse"][0] + config.loss.beta * terms["kl"][0] + terms["seg"][0]
      + 0.25 * terms["composition_ce"][0], rtol=1e-6)


@pytest.mark.slow
def test_a_head_added_to_a_trained_model_starts_from_its_weights(trained_workdir, tfds_dir):
  config = tiny_config(tfds_dir)
  config.model.composition_head = True
  state = train.initialised_from(train.create_train_state(config, jax.random.key(1)),
                                 str(trained_workdir))
  params, trained = jax.device_get(state.params), _params(trained_workdir)
  head = params.pop("composition")
  composition_in = [params["encoder"].pop(name) for name in ("composition_mean",
                                                             "composition_logvar")]
  _assert_trees_close(params, trained, rtol=0, atol=0)
  assert head["Dense_2"]["kernel"].shape[-1] == config.dataset.max_z + 1
  # The encoder's composition input starts at zero: the trained latent is unchanged.
  assert all(not np.any(layer["kernel"]) for layer in composition_in)
  model = inference.TrainedModel(config, {"params": state.params,
                                          "batch_stats": state.batch_stats})
  grids = model.voxelize([datasets.record_to_crystal(datasets.split_source(config.dataset,
                                                                           "train")[0])])
  with pytest.raises(ValueError, match="composition"):
    model.encode(grids["density"])
  mean, _ = model.encode(grids["density"], composition=grids["composition"])
  trained_mean, _ = inference.TrainedModel.restore(trained_workdir).encode(grids["density"])
  np.testing.assert_allclose(mean, trained_mean, rtol=1e-5, atol=1e-6)
  decoded = model.decode(mean)
  np.testing.assert_allclose(decoded["composition"].sum(axis=-1), [1.0], rtol=1e-5)
  assert len(model.to_crystals(decoded)) == 1


def test_lr_mults_scale_the_steps_of_matching_parameters(tfds_dir):
  config = tiny_config(tfds_dir)
  config.learning_rate = 0.1
  config.lr_mults = (("composition", 10.0), ("encoder/mean", 0.5))
  params = {"composition": {"kernel": jnp.zeros(2)},
            "encoder": {"mean": {"kernel": jnp.zeros(1)}, "logvar": {"kernel": jnp.zeros(1)}}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = adam.optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr · g / (|g| + eps) ≈ lr per parameter.
  np.testing.assert_allclose(updates["composition"]["kernel"], [-1.0, -1.0], rtol=1e-4)
  np.testing.assert_allclose(updates["encoder"]["mean"]["kernel"], [-0.05], rtol=1e-4)
  np.testing.assert_allclose(updates["encoder"]["logvar"]["kernel"], [-0.1], rtol=1e-4)


@pytest.mark.parametrize("grad_clip_norm, lr_mults, lr_schedule", [
    (0.0, (), "constant"),  # the paper's
    (0.05, (("bias", 3.0),), "warmup_cosine"),  # clipped at every step
    (100.0, (), "warmup_cosine"),  # never clipped
])
def test_native_adam_steps_are_optax_steps(grad_clip_norm, lr_mults, lr_schedule, tfds_dir,
                                           monkeypatch):
  """adam.apply_gradients on the CPU (kernels.adam: one pass per array, in place) against
  optax's chain (the same function without the native kernels) over five jitted steps:
  parameters, Adam's moments and counts, and the gradient norm."""
  require_native()
  config = tiny_config(tfds_dir)
  config.update(learning_rate=1e-2, warmup_steps=2, num_train_steps=10,
                grad_clip_norm=grad_clip_norm, lr_mults=lr_mults, lr_schedule=lr_schedule)
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 3, 16, 17)), "bias": rng.normal(size=5)},
            "dense": {"kernel": rng.normal(size=(700, 901))}}  # > 2^18 values: two threads
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)

  def run():
    state = train.TrainState.create(apply_fn=None, params=jax.tree.map(jnp.copy, params),
                                    tx=adam.optimizer(config),
                                    batch_stats={})
    step = jax.jit(lambda state, grads: adam.apply_gradients(state, grads, {}, config),
                   donate_argnums=0)
    norms = []
    for i in range(5):
      grads = jax.tree.map(lambda p: jnp.asarray(
          np.random.default_rng(i).normal(size=p.shape) * 0.01 * (i + 1), jnp.float32), params)
      state, norm = step(state, grads)
      norms.append(float(norm))
    return jax.device_get((state.step, state.params, state.opt_state)), norms

  fused, fused_norms = run()
  monkeypatch.setattr(kernels, "available", lambda: False)
  reference, reference_norms = run()
  np.testing.assert_allclose(fused_norms, reference_norms, rtol=1e-5)
  step, fused_params, fused_state = fused
  assert step == reference[0] == 5
  _assert_trees_close(fused_params, reference[1], rtol=0, atol=1e-6)
  # The moments to 1e-5 of each array's largest (the clipped gradients differ in float rounding of
  # the norm, which shows relatively where a moment's sum cancels).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * np.abs(y).max()),
               fused_state, reference[2])


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(trained_workdir, tfds_dir,
                                                                      tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  for data in (workdir / "checkpoints" / "4" / "state").rglob("d/*"):
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  # A save killed before its commit leaves only orbax's temporary directory: never a step.
  (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
  model = inference.TrainedModel.restore(workdir)
  step_2 = inference.TrainedModel.restore(trained_workdir, step=2).variables["params"]
  _assert_trees_close(jax.device_get(model.variables["params"]), jax.device_get(step_2),
                      rtol=0, atol=0)
  assert "checkpoint 4 in" in caplog.text and "does not restore, skipped" in caplog.text
  # Training resumes from step 2, sets the broken step 4 aside and ends as the uninterrupted run.
  train.train_and_evaluate(tiny_config(tfds_dir), str(workdir))
  _assert_trees_close(_params(workdir), _params(trained_workdir), rtol=0, atol=0)
  assert (workdir / "checkpoints" / "4.unrestorable").is_dir()


@pytest.mark.slow
def test_a_failed_checkpoint_write_stops_with_the_last_one_intact(trained_workdir, tfds_dir,
                                                                  tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)

  def full_disk(*args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.decoder": Failed writing')

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", full_disk)
  config = tiny_config(tfds_dir)
  config.num_train_steps = 6
  with pytest.raises(checkpoints.CheckpointWriteError,
                     match=r"RESOURCE_EXHAUSTED.*newest complete checkpoint \(4\) is intact"):
    train.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  assert checkpoints.checkpoint_manager(workdir, read_only=True).all_steps() == [2, 4]
  _assert_trees_close(_params(workdir), _params(trained_workdir), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("representation", ["repeat", "unit_cell"])
def test_a_model_without_a_segmenter_trains_without_the_unet(representation, tfds_dir, tmp_path):
  """model.segmenter=False (both `cpu` recipes): no U-Net parameters, no species loss (the loss
  is MSE + β·KL and the heads'), training and evaluation run, and a mode that would segment is
  refused in one line."""
  config = tiny_config(tfds_dir, representation)
  config.model.segmenter = False
  config.loss.teacher_forcing = 1.0  # nothing to force without a U-Net
  config.eval.atoms_from = "density"
  state = train.create_train_state(config, jax.random.key(0))
  assert "unet" not in state.params and "encoder" in state.params
  grid = config.voxel.grid
  rng = np.random.default_rng(0)
  batch = {"density": jnp.asarray(rng.exponential(size=(2, grid, grid, grid)), jnp.float32),
           "species": jnp.asarray(rng.integers(0, 3, (2, grid, grid, grid)) * 8, jnp.int32),
           "lattice": jnp.tile(jnp.eye(3) * 4.0, (2, 1, 1)), "rotation": jnp.tile(jnp.eye(3), (2, 1, 1))}
  outputs = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                           batch["density"], jax.random.key(1), train=False, teacher_forcing=True)
  assert "segmented" not in outputs and "segmented_true" not in outputs
  terms = train.voxel_losses(outputs, batch, config)
  assert "seg" not in terms and "atom_voxels" not in terms
  np.testing.assert_allclose(
      train.total_loss(terms, config),
      np.mean(terms["mse"] + config.loss.beta * terms["kl"]
              + config.loss.lattice_weight * terms["lattice_mse"]), rtol=1e-6)
  metrics = train.summarise(terms, config)
  assert "atom_voxel_accuracy" not in metrics and "loss_unet" not in metrics
  np.testing.assert_allclose(metrics["loss_vae"],
                             metrics["mse"] + config.loss.beta * metrics["kl"], rtol=1e-6)

  train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4, 4]
  assert all("seg" not in r and np.isfinite(r["mse"]) for r in records)
  model = inference.TrainedModel.for_mode(config, tmp_path, dataset_given=False)
  decoded = model.decode(np.zeros((1, config.model.latent_dim), np.float32))
  assert decoded["density"].shape == (1, grid, grid, grid)
  assert not decoded["species"].any()  # nothing segmented
  config.eval.num_batches = 1
  metrics = evaluate.evaluate(model, config.eval, tmp_path / "eval")
  assert metrics["num_samples"] == config.eval.batch_size and 0 <= metrics["valid_rate"] <= 1
  config.eval.atoms_from = "segmenter"
  with pytest.raises(inference.SettingsError, match="no segmenter"):
    inference.TrainedModel.for_mode(config, tmp_path, dataset_given=False)
