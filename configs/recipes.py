"""The recipes: the changes to the paper's settings (`configs/default.py`) that train a model on a
budget. `--config=configs/<representation>.py:<recipe>`:

  paper    the paper's settings (no change)
  quick    the embedded perov_5 in under 10 minutes on 2 CPU cores, then held-out crystals rebuilt
  cpu      perov_5 on a 2-core CPU in about two hours
  gpu      perov_5 on one GPU in minutes (the shipped perov5 models)
  mp_cpu   the Materials Project on a 2-core CPU, resumable (`launch/train_mp_cpu.sh`)
  mp_gpu   the Materials Project on one H100/H200

All but `paper` start from `learns_on_cpu` (docs/training.md, "What makes the model learn").
"""

from collections.abc import Callable

import ml_collections

from crystal_vae.configs import default


def get_config(representation: str, recipe: str | None = None) -> ml_collections.ConfigDict:
  """The paper's settings for `representation` changed by `recipe` (None = "paper")."""
  config = default.get_config(representation)
  if recipe in (None, "", "paper"):
    return config
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; use one of {('paper', *RECIPES)} or nothing")
  learns_on_cpu(config)
  RECIPES[recipe](config)
  return config


def for_command_line(representation: str, recipe: str | None) -> ml_collections.ConfigDict:
  """`get_config` for a config file: a wrong recipe ends the command in one line (flag parsing
  would otherwise print the ValueError inside a traceback)."""
  try:
    return get_config(representation, recipe)
  except ValueError as error:
    raise SystemExit(f"error: --config=configs/{representation}.py:{recipe}: {error}") from None


def learns_on_cpu(config: ml_collections.ConfigDict) -> None:
  """What makes the model learn within a CPU budget (docs/training.md, "What makes the model learn"): the
  mask + Z species head, a balanced species loss, the U-Net also trained on the true density,
  a softplus decoder output, a warmed-up, cosine-decayed learning rate with gradient clipping,
  cubes placed as at evaluation (no random offset or rotation) and crystals read off the
  decoded density (density_fit.py)."""
  config.model.species_head = "mask_z"
  config.model.decoder_output = "softplus"
  config.loss.balanced = True
  config.loss.teacher_forcing = 1.0
  # At 1e-3 the 30³ run diverged after 100 steps (gradient-norm spikes to ~100, KL 5500).
  config.learning_rate = 3e-4
  config.lr_schedule = "warmup_cosine"
  config.grad_clip_norm = 5.0
  # Cubes with a cell corner at the origin, as at evaluation: with random offsets the decoder
  # learned little more than each cube's mean density within the budget.
  config.voxel.random_offset = False
  # Unit cells unrotated, as at evaluation: with random rotations the lattice head, which must then
  # read the cell's orientation, stayed at the constant answer (docs/training.md, "Making the model learn").
  config.voxel.rotate = False
  config.eval.atoms_from = "density"
  # On decoded densities the fit finds spurious light sites: of 64 perov_5 validation cubes the
  # lattice and positions were right for 5 at min Z 4, 31 at 6. The price: perov_5's Li and B
  # cations are dropped too (true densities: 56 of 64 rebuilt at 6, 62 at 0.5).
  config.eval.min_site_z = 6.0
  if config.representation == "unit_cell":
    config.loss.lattice_weight = 0.1  # the lattice head gives every unit cell's lattice
    # One cell's atoms, no lattice to read (density_fit.atoms_from_density): at 3 the shipped
    # unit cell reads 94.2% of the first 1,024 perov_5 validation cells with their atom count.
    config.eval.min_site_z = 3.0


def perov5(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """perov_5 at the paper's 30³ grid with 3³ decoder kernels (4 -> 8 -> 16 -> 32 -> VALID 30, a
  third of the paper decoder's FLOPs): what the `cpu` and `gpu` models share."""
  config.dataset.name = "perov_5"
  config.dataset.path = ""  # the embedded copy (crystal_vae/data/perov_5)
  config.model.decoder_start = 4
  config.model.decoder_kernels = (3, 3, 3)
  config.model.decoder_paddings = ("SAME", "SAME", "SAME")
  config.batch_size = 16
  config.warmup_steps = 100
  config.log_every_steps = 25
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 100
  config.eval.batch_size = 32
  config.eval.num_batches = 8
  # perov_5's crystals are (nearly) cubic perovskites: on the first 1,024 validation crystals
  # the `cpu` repeat model's median nearest-atom distances fall from 0.22 / 0.23 Å to
  # 0.13 / 0.13 Å (docs/evaluation.md, "Symmetrised crystals").
  config.eval.symprec = 0.8
  return config


def cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """perov_5 in about two hours on a 2-core CPU. No U-Net (two thirds of the step's time, and
  both representations read their atoms off the decoded density): the time goes to 5,000 steps
  of a 128-d latent, a strided encoder (30 -> 15 -> 15 -> 8 -> 4) and the composition head,
  whose layers take 10x the learning rate (at 1x it learned too slowly: docs/training.md, "Making the
  model learn")."""
  perov5(config)
  config.model.decoder_features = (32, 16, 8)
  config.num_train_steps = 5000
  config.model.segmenter = False
  config.loss.teacher_forcing = 0.0
  config.model.latent_dim = 128
  config.model.encoder_features = (16, 32, 64, 64)
  config.model.encoder_strides = (2, 1, 2, 2)
  config.model.composition_head = True
  config.loss.composition_weight = 1.0
  config.lr_mults = (("composition", 10.0),)
  config.loss.beta = 1e-5
  if config.representation == "repeat":
    # Its density is sharp enough to keep perov_5's light cations: on the first 128 validation
    # crystals 61.7% matched at min Z 4, 58.6% at 6.
    config.eval.min_site_z = 4.0
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 250
  return config


def gpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """perov_5 on one GPU (the shipped `pretrained/perov5_repeat`): the recipe with a strided
  encoder (30 -> 15 -> 15 -> 8 -> 4), a 128-d latent, a decoder (128, 64, 32) and U-Net
  (16, 32, 64), the composition head, β = 1e-5 and batch 32; 2.8 M parameters, small enough to
  ship. One H200 trains ~26 steps/s."""
  perov5(config)
  config.model.latent_dim = 128
  config.model.encoder_features = (16, 32, 64, 64)
  config.model.encoder_strides = (2, 1, 2, 2)
  config.model.decoder_features = (128, 64, 32)
  config.model.unet_features = (16, 32, 64)
  config.model.composition_head = True
  config.loss.composition_weight = 1.0
  config.loss.beta = 1e-5
  config.batch_size = 32
  config.warmup_steps = 200
  config.num_train_steps = 6000
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500
  return config


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The quick start: the `cpu` model on the embedded perov_5, then 128 validation crystals (not
  trained on) rebuilt and matched. The unit cell learns the compositions sooner: 1,500 steps,
  under 10 minutes on 2 cores in all; the repeat model needs 3,500 (docs/results.md, "Quick
  start")."""
  cpu(config)
  config.num_train_steps = 1500 if config.representation == "unit_cell" else 3500
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.eval.after_training = 128
  # Each latent refined towards its crystal's density before rebuilding: on 128 validation
  # crystals of a 2,500-step repeat model, 42.2% matched with 100 steps, 25.8% without.
  config.eval.refine_steps = 100
  config.sample.num = 32
  config.sample.num_reference = 256
  config.sample.prior_crystals = 1000
  config.sample.num_train_structures = 200
  config.discriminator.features = (8, 16, 32)
  config.discriminator.num_train_steps = 300
  config.discriminator.log_every_steps = 50
  config.discriminator.num_real = 200
  config.discriminator.num_eval = 32
  return config


def materials_project(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's own data: the CGCNN Materials Project CSV (`dataset.path` names its directory on
  the command line), its seeded 0.8/0.1/0.1 split, cells with every side < 10 Å and at most 64
  atoms. 30³ grid, 3³ decoder kernels, the composition head; atoms read off the density."""
  config.dataset.name = "csv"
  config.model.decoder_start = 4
  config.model.decoder_kernels = (3, 3, 3)
  config.model.decoder_paddings = ("SAME", "SAME", "SAME")
  config.model.encoder_strides = (2, 1, 2, 2)
  config.model.composition_head = True
  config.loss.composition_weight = 1.0
  config.lr_mults = (("composition", 10.0),)
  config.loss.beta = 1e-5
  config.warmup_steps = 200
  config.eval.batch_size = 32
  config.eval.num_batches = 4
  # General crystals hold H, Li, Be: sites down to Z 2 are kept (light atoms are named by the
  # composition head); symmetrised only within 0.1 Å (most MP cells are of low symmetry).
  config.eval.min_site_z = 2.0
  config.eval.symprec = 0.1
  return config


def mp_cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Materials Project on a 2-core CPU, resumable (`launch/train_mp_cpu.sh`): the `cpu`
  model (no U-Net) with a 256-d latent and a decoder twice as wide; Adam 1e-4 for repeat cubes."""
  materials_project(config)
  config.model.segmenter = False
  config.loss.teacher_forcing = 0.0
  config.model.latent_dim = 256
  config.model.encoder_features = (16, 32, 64, 64)
  config.model.decoder_features = (64, 32, 16)
  config.batch_size = 16
  config.num_train_steps = 20_000
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 250
  if config.representation == "repeat":
    # At 3e-4 the repeat cubes' gradient spiked (norm 173 at step 600) and the validation voxel
    # MSE stayed at the per-cube mean (0.31-0.34 to step 2,200); at 1e-4 it fell below it
    # (0.301 / 0.286 at steps 400 / 800) with no spike (docs/training.md).
    config.learning_rate = 1e-4
  return config


def mp_gpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Materials Project on one H100/H200: the `gpu` model with a 256-d latent, a wider
  encoder, the attention U-Net (16, 32, 64) and batch 64. Not yet timed on a GPU: 12,000 steps
  are sized from the perov_5 `gpu` model's ~26 steps/s at batch 32 on one H200."""
  materials_project(config)
  config.model.latent_dim = 256
  config.model.encoder_features = (32, 64, 128, 128)
  config.model.decoder_features = (128, 64, 32)
  config.model.unet_features = (16, 32, 64)
  config.batch_size = 64
  config.num_train_steps = 12_000
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000
  return config


RECIPES: dict[str, Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]] = {
    "quick": quick, "cpu": cpu, "gpu": gpu, "mp_cpu": mp_cpu, "mp_gpu": mp_gpu}
