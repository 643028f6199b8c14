"""Every default of crystal_vae, once: the paper's settings (Adam, lr 1e-5, batch 24, γ = 0.1,
latent 300, a 30³ grid over a 10 Å cube) for a representation, "repeat" or "unit_cell".

`configs/repeat.py` and `configs/unit_cell.py` choose the representation and a recipe
(`configs/recipes.py`); a saved config older than a field takes the field's default from here
(`checkpoints.restore_config`). Installed with the package as `crystal_vae.configs`.
"""

import ml_collections

REPRESENTATIONS = ("unit_cell", "repeat")


def get_config(representation: str = "repeat") -> ml_collections.ConfigDict:
  """The paper's settings for `representation` (`--config=configs/default.py:unit_cell`)."""
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

  # The networks (models.CrystalVAE, built from these fields by models.model_from_config): the
  # paper's sizes. The encoder: 3-D convolutions (kernels, strides) with batch norm, to the
  # latent's mean and log-variance.
  config.model = ml_collections.ConfigDict()
  config.model.latent_dim = 300
  config.model.encoder_features = (16, 32, 64, 128)
  config.model.encoder_kernels = (5, 3, 3, 3)
  config.model.encoder_strides = (2, 1, 1, 2)
  # The decoder: a dense layer to a decoder_start³ cube, then trilinear upsampling and
  # convolutions (features, kernels, paddings) to the grid.
  config.model.decoder_start = 5
  config.model.decoder_features = (64, 32, 16)
  config.model.decoder_kernels = (5, 5, 4)
  config.model.decoder_paddings = ("SAME", "VALID", "SAME")
  config.model.decoder_output = "relu"  # relu | softplus (models.DECODER_OUTPUTS)
  # The attention U-Net segmenting the decoded density into species; False = no U-Net (atoms are
  # read off the decoded density alone).
  config.model.segmenter = True
  config.model.unet_features = (16, 32, 64, 128)
  # The U-Net's output: "classes" (a class per Z, the paper) or "mask_z" (atom / empty and Z).
  config.model.species_head = "classes"
  # The unit cell's lattice; a repeat cube's when the cube does not show it (a cell side too long
  # to appear twice in it), the periodic reading of the atoms preferred (reconstruction.py).
  config.model.lattice_head = True
  config.model.lattice_hidden = (256, 128)
  # The encoder also reads the crystal's composition and a head reads it back from the latent.
  config.model.composition_head = False
  config.model.composition_hidden = (256, 256)
  config.model.composition_members = 1  # an ensemble of this many heads (head_fit.py)
  # Numeric dataset properties a head predicts from the latent mean (their means and standard
  # deviations over the training split are set by train.py).
  config.model.properties = ()
  config.model.property_hidden = (128, 128)
  config.model.property_means = ()
  config.model.property_stds = ()
  # The decoder also reads a condition (the crystal's maximum density: conditional.py).
  config.model.conditional = False
  config.model.conv_impl = "auto"  # auto | xla | fft | native (models.convolution.CONV_IMPLS)
  config.model.dtype = "float32"  # of the activations (bfloat16 on GPUs)

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
  # the lattice head, density_fit.atoms_from_density).
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
  # The fraction of them the prior is fitted to: those whose latent mean decodes closest to their
  # own density (voxel MSE), so that draws fall where the model reconstructs well (1 = all).
  config.sample.prior_best_fraction = 1.0
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
  # Where the latents are drawn from: a prior of `sample.prior`'s choices, fitted with the
  # `sample.prior_*` settings (the model's own learned prior, latent_prior/, by default).
  config.conditional.prior = "learned"
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
  # screen: `screen_draws` latents of the model's prior (`sample.prior`), the `screen_rebuilt` its
  # head ranks best rebuilt and read again by the model, the best `num` kept; gradient: CDVAE's
  # protocol, Adam from `num` starts (optimize.py).
  config.optimize.method = "screen"
  config.optimize.num = 16
  config.optimize.seed = 0  # of the prior draws
  config.optimize.judge = ""  # workdir of an independently trained property model
  config.optimize.batch_size = 16
  config.optimize.screen_draws = 16000
  config.optimize.screen_rebuilt = 300
  config.optimize.start = "encoded"  # gradient: encoded (the first crystals of `split`) | prior
  config.optimize.split = "validation"
  config.optimize.steps = 200
  config.optimize.learning_rate = 0.01  # Adam on the latents
  config.optimize.prior_weight = 0.01  # weight of |z|² / 2 beside the standardised property
  config.optimize.num_saved = 5  # steps decoded, rebuilt and judged
  return config
