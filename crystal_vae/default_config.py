"""Shared defaults behind `configs/unit_cell.py` and `configs/repeat.py`.

`get_config(representation, arg)` returns the paper's settings (Adam, lr 1e-5, batch 24,
γ = 0.1, 30³ grid over a 10 Å cube) for arg None/"paper"; "cpu" trains perov_5 at 30³ on a
2-core CPU in about two hours, "gpu" a wider perov_5 model on one GPU in minutes and "quick" the
embedded perov_5 in under 10 minutes (then rebuilds held-out crystals), all with the changes that make the model learn on such a
budget (`_learns_on_cpu`).
"""

import ml_collections

from crystal_vae import models

REPRESENTATIONS = ("unit_cell", "repeat")


def get_config(representation: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The full config for `representation`; `arg` is None/"paper", "cpu", "gpu" or "quick"."""
  if representation not in REPRESENTATIONS:
    raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A workdir whose latest checkpoint starts the parameters this model shares with it (same
  # path and shape), e.g. to add a head to a trained model; "" = random initialisation. Used
  # only when the workdir has no checkpoint of its own.
  config.init_from = ""
  config.representation = representation
  config.num_devices = -1  # -1: every local device; the batch is split over a `data` mesh axis.

  box = ml_collections.FieldReference(10.0)
  max_atoms = ml_collections.FieldReference(64)
  max_z = ml_collections.FieldReference(100)

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "perov_5"  # prototypes | perov_5 | carbon_24 | mp_20 | csv | cif_dir
  config.dataset.path = ""  # a local directory; "" = embedded (perov_5, prototypes) or download
  config.dataset.data_dir = ""  # where TFDS keeps built datasets; "" = TFDS default
  config.dataset.split_seed = 0
  config.dataset.split_fractions = (0.8, 0.1, 0.1)
  config.dataset.box = box
  config.dataset.max_z = max_z
  config.dataset.max_atoms = max_atoms

  config.voxel = ml_collections.ConfigDict()
  config.voxel.grid = 30
  config.voxel.box = box
  config.voxel.sigma = 1.0
  config.voxel.species_radius = 0.5
  config.voxel.cutoff_sigmas = 5.0
  config.voxel.rotate = representation == "unit_cell"
  config.voxel.random_offset = representation == "repeat"

  config.model = models.default_model_config()
  # The unit cell's lattice; a repeat cube's when the cube does not show it (a cell side too long
  # to appear twice in it), the periodic reading of the atoms preferred (reconstruction.py).
  config.model.lattice_head = True

  config.loss = ml_collections.ConfigDict()
  config.loss.beta = 1e-4  # KL weight; KL is summed over latent dims, MSE averaged over voxels.
  config.loss.gamma = 0.1  # weight of the U-Net's cross-entropy in the VAE loss (paper).
  config.loss.balanced = False  # average the species loss over atom and empty voxels apart.
  config.loss.z_weight = 0.1  # species_head "mask_z": weight of the Z / 10 regression.
  config.loss.teacher_forcing = 0.0  # weight of the U-Net's loss on the TRUE density.
  # Weight of the squared Z error the decoded density implies at the atom voxels
  # (losses.site_z_error): the voxel MSE of a species one unit of Z off is ~2e-5 per atom.
  config.loss.site_z_weight = 0.0
  config.loss.lattice_weight = 0.01  # MSE (÷ box²) of the predicted oriented lattice.
  config.loss.composition_weight = 0.1  # model.composition_head: weight of its cross-entropy.
  # model.properties: weight of the property head's squared error (each property standardised).
  config.loss.property_weight = 1.0

  config.learning_rate = 1e-5
  config.lr_schedule = "constant"  # constant | warmup_cosine
  config.warmup_steps = 0
  config.final_learning_rate_fraction = 0.01  # warmup_cosine: the rate at the last step.
  config.grad_clip_norm = 0.0  # clip the global gradient norm to this; 0 = no clipping.
  # (regex, multiplier) pairs: parameters whose path ("composition/Dense_0/kernel") matches take
  # steps `multiplier` times the learning rate, e.g. a head added to a trained model.
  config.lr_mults = ()
  config.batch_size = 24  # global; split over processes and devices.
  config.num_train_steps = 200_000
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 5_000
  config.max_checkpoints_to_keep = 3

  config.eval = ml_collections.ConfigDict()
  config.eval.split = "validation"
  config.eval.batch_size = 24
  config.eval.num_batches = -1  # -1: the whole split.
  config.eval.oracle = False  # post-process the TRUE species grids instead of decoded ones.
  config.eval.min_component_size = 3  # voxels; smaller fragments join a neighbour or are dropped.
  # Atoms of a decoded cube: "segmenter" (the paper: components of the U-Net's species grid, species
  # by majority vote) or "density" (least squares on the decoded density alone: for a repeat cube
  # the lattice, sites and Z, density_fit.py; for a unit cell the atoms and Z, the lattice from
  # the lattice head, segmentation.atoms_from_density).
  config.eval.atoms_from = "segmenter"
  # atoms_from=density: sites (atoms) fitted with Z below this are noise of the decoded density.
  config.eval.min_site_z = 0.5
  # model.composition_head: the cell's elements are the most probable given the decoded
  # composition and the sites' Z; False = the species the density (or the segmenter) gives alone.
  config.eval.species_from_composition = True
  # The spread (units of Z) of the density's site Z around the true one in that choice: smaller
  # trusts the density more, larger the composition (species_choice.species_from_composition).
  config.eval.site_z_sigma = 1.5
  # > 0: every rebuilt crystal is made symmetric under the space-group operations that hold within
  # this many Å (symmetry.symmetrize: sites and lattice averaged over them, the frame kept). Loose
  # tolerances suit high-symmetry datasets only: on carbon_24's true crystals 0.8 Å moves 10% of
  # the atoms by 0.27 Å or more; on perov_5's 1% by more than 0.23 Å (90%: 0.024 Å or less).
  config.eval.symprec = 0.0
  # Adam steps on each crystal's latent, from the encoder's mean, lowering the voxel MSE of its
  # decoded density against the true one before the crystal is rebuilt (0: the mean itself).
  config.eval.refine_steps = 0
  config.eval.refine_learning_rate = 0.01
  # `--mode=train`: after the last step, rebuild this many crystals of `split` (rounded up to whole
  # batches) with the trained model and measure them, as `--mode=evaluate` does; 0 = none.
  config.eval.after_training = 0

  config.sample = ml_collections.ConfigDict()  # --mode=sample (generation.py)
  config.sample.num = 64
  config.sample.seed = 0
  config.sample.temperature = 1.0  # the prior's spread scaled by this (1 = the prior itself)
  # Where the latents are drawn from (latent_prior.py): learned (a diffusion model over the
  # latent means of `prior_crystals` training crystals), mixture (a Gaussian mixture of
  # `prior_components`), fitted (their Gaussian) or standard (the VAE's N(0, I), the paper's).
  # A fitted prior is saved in the workdir (latent_prior/) and reused with the same checkpoint.
  config.sample.prior = "learned"
  config.sample.prior_crystals = 5000  # -1 = every training crystal
  config.sample.prior_components = 32  # mixture
  config.sample.prior_features = 256  # learned: the denoiser's width,
  config.sample.prior_blocks = 3  # its residual blocks,
  config.sample.prior_train_steps = 4000  # its Adam steps (batch 256)
  config.sample.prior_sampling_steps = 100  # and the denoising steps of a draw
  config.sample.batch_size = 16
  config.sample.num_train_structures = 500  # training crystals for the nearest-neighbour figure
  # Reference crystals of CDVAE's coverage and Wasserstein distances (CDVAE: the test split).
  config.sample.reference_split = "validation"
  config.sample.num_reference = 1000  # the first ones of the split; -1 = all
  config.sample.gallery = 16  # samples shown in gallery.png

  config.interpolate = ml_collections.ConfigDict()  # --mode=interpolate (generation.py)
  config.interpolate.start = ""  # a CIF path or a dataset id; "" = the first training crystal
  config.interpolate.end = ""  # ... "" = the second training crystal
  config.interpolate.steps = 8
  config.interpolate.seconds_per_frame = 0.4  # of interpolation.gif

  config.traverse = ml_collections.ConfigDict()  # --mode=traverse (generation.py)
  config.traverse.crystal = ""  # a CIF path or a dataset id; "" = the first training crystal
  config.traverse.dim = 0
  config.traverse.steps = 7
  config.traverse.low = -3.0
  config.traverse.high = 3.0

  config.conditional = ml_collections.ConfigDict()  # --mode=conditional (conditional.py)
  config.conditional.targets = ()  # target maximum densities; () = the range below
  config.conditional.target_min = 0.5
  config.conditional.target_max = 4.0
  config.conditional.num_targets = 5
  config.conditional.num_samples = 16
  config.conditional.seed = 0
  config.conditional.batch_size = 16

  config.discriminator = ml_collections.ConfigDict()  # --mode=discriminator (discriminator.py)
  config.discriminator.features = (16, 32, 64)
  config.discriminator.loss = "bce"  # bce | mse, on the sigmoid output regressing λ
  config.discriminator.learning_rate = 1e-3
  config.discriminator.batch_size = 16
  config.discriminator.num_train_steps = 2_000
  config.discriminator.log_every_steps = 100
  config.discriminator.num_real = 500  # training crystals whose latent means are mixed
  config.discriminator.num_eval = 64  # crystals of eval.split scored as "real"
  config.discriminator.ood_scale = 3.0  # out-of-distribution draws z ~ N(0, ood_scale²)
  config.discriminator.seed = 0

  config.optimize = ml_collections.ConfigDict()  # --mode=optimize (optimize.py)
  config.optimize.property = ""  # a name in model.properties; "" = the first
  config.optimize.direction = "minimize"  # minimize | maximize
  config.optimize.start = "encoded"  # encoded (the first crystals of `split`) | prior
  config.optimize.split = "validation"
  config.optimize.num = 16
  config.optimize.seed = 0  # of the prior draws
  config.optimize.steps = 200
  config.optimize.learning_rate = 0.01  # Adam on the latents
  config.optimize.prior_weight = 0.01  # weight of |z|² / 2 beside the standardised property
  config.optimize.num_saved = 5  # steps decoded, rebuilt and judged
  config.optimize.judge = ""  # workdir of an independently trained property model
  config.optimize.batch_size = 16

  if arg in (None, "", "paper"):
    return config
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; use one of {VARIANTS} or nothing")
  _learns_on_cpu(config)
  if arg == "cpu":
    return _cpu(config)
  if arg == "gpu":
    return _gpu(config)
  if arg == "mp_cpu":
    return _mp_cpu(config)
  if arg == "mp_gpu":
    return _mp_gpu(config)
  return _quick(config)


VARIANTS = ("paper", "cpu", "gpu", "quick", "mp_cpu", "mp_gpu")


def _learns_on_cpu(config: ml_collections.ConfigDict) -> None:
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
    # One cell's atoms, no lattice to read (segmentation.atoms_from_density): at 3 the shipped
    # unit cell reads 94.2% of the first 1,024 perov_5 validation cells with their atom count.
    config.eval.min_site_z = 3.0


def _perov5(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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


def _cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """perov_5 in about two hours on a 2-core CPU. No U-Net (two thirds of the step's time, and
  both representations read their atoms off the decoded density): the time goes to 5,000 steps
  of a 128-d latent, a strided encoder (30 -> 15 -> 15 -> 8 -> 4) and the composition head,
  whose layers take 10x the learning rate (at 1x it learned too slowly: docs/training.md, "Making the
  model learn")."""
  _perov5(config)
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


def _gpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """perov_5 on one GPU (the shipped `pretrained/perov5_repeat`): the recipe with a strided
  encoder (30 -> 15 -> 15 -> 8 -> 4), a 128-d latent, a decoder (128, 64, 32) and U-Net
  (16, 32, 64), the composition head, β = 1e-5 and batch 32; 2.8 M parameters, small enough to
  ship. One H200 trains ~26 steps/s."""
  _perov5(config)
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


def _quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The quick start: the `cpu` model on the embedded perov_5, then 128 validation crystals (not
  trained on) rebuilt and matched. The unit cell learns the compositions sooner: 1,500 steps,
  under 10 minutes on 2 cores in all; the repeat model needs 3,500 (docs/results.md, "Quick
  start")."""
  _cpu(config)
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


def _materials_project(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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


def _mp_cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Materials Project on a 2-core CPU, resumable (`launch/train_mp_cpu.sh`): the `cpu`
  model (no U-Net) with a 256-d latent and a decoder twice as wide."""
  _materials_project(config)
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
  return config


def _mp_gpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Materials Project on one H100/H200: the `gpu` model with a 256-d latent, a wider
  encoder, the attention U-Net (16, 32, 64) and batch 64. Not yet timed on a GPU: 12,000 steps
  are sized from the perov_5 `gpu` model's ~26 steps/s at batch 32 on one H200."""
  _materials_project(config)
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
