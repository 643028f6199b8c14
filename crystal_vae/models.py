"""Flax models: the β-VAE over voxel densities, the attention U-Net segmenter and a lattice head.

Everything is channels-last and a pure function of parameters and inputs; the layers'
convolutions, pooling, resizing and batch-normalisation sums run on `crystal_vae/native/` (its
convolution back-ends and CPU kernels, chosen per layer). Densities are
(B, G, G, G) arrays; the VAE maps them to a latent (mean, logvar) of size L and back, the U-Net
maps a (decoded) density to per-voxel segmentation outputs whose meaning the species head sets
(`SPECIES_HEADS`, turned into a species grid by `species_grid`):
  "classes"  (paper)  logits over 0 (no atom) .. max_z, (B, G, G, G, max_z + 1); species = argmax.
  "mask_z"            2 channels: an atom / no-atom logit and the atomic number divided by
                      `Z_SCALE` (a regression); species = round(Z) where the logit is > 0.

Shape path of the paper decoder (G = 30, `decoder_start` 5, kernels (5, 5, 4), paddings
(SAME, VALID, SAME)), computed by `decoder_sizes`:
  Dense -> 5^3 x 128 -> up 10 -> conv5 SAME 10 x 64 -> up 20 -> conv5 VALID 16 x 32
  -> up 32 -> conv4 SAME 32 x 16 -> conv3 VALID 30 x 1 (final kernel = 32 - 30 + 1).

Config fields read by `model_from_config` (see `default_model_config` for the paper values):
  config.voxel.grid            G, the cube's voxels per side.
  config.dataset.max_z         species classes are 0..max_z.
  config.model.latent_dim      L.
  config.model.encoder_features / encoder_kernels / encoder_strides   per encoder conv (SAME).
  config.model.decoder_start   side of the cube the decoder's Dense output is reshaped to; its
                               channels are encoder_features[-1].
  config.model.decoder_features / decoder_kernels / decoder_paddings  per upsampling round.
  config.model.unet_features   U-Net features per level, finest first (last = bottleneck).
  config.model.lattice_head    whether to build `LatticeHead`; lattice_hidden its hidden widths.
  config.model.conditional     multiply the bottleneck by the per-sample `condition` (§4.5).
  config.model.properties      names of numeric dataset properties a `PropertyHead` predicts
                               from the latent mean (property_hidden, property_means/stds).
  config.model.segmenter       whether to build the U-Net (paper); without it atoms are read off
                               the decoded density only (`eval.atoms_from=density`, repeat).
  config.model.species_head    'classes' (paper) or 'mask_z' (see above).
  config.model.decoder_output  'relu' (paper) or 'softplus': the decoder's last activation.
  config.model.conv_impl       'auto', 'xla', 'depth_sum', 'fft' or 'native' (see
                               `native.convolution.conv3d`).
  config.model.dtype           computation dtype name ('float32', 'bfloat16'); params are float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from jax import lax

from crystal_vae.native import convolution
from crystal_vae.native import kernels
from crystal_vae.native import ops

SPECIES_HEADS = ("classes", "mask_z")
DECODER_OUTPUTS = ("relu", "softplus")
Z_SCALE = 10.0  # the "mask_z" head regresses Z / Z_SCALE, O(1) for every element.


def segmenter_channels(species_head: str, max_z: int) -> int:
  """Output channels of the U-Net for a species head."""
  if species_head not in SPECIES_HEADS:
    raise ValueError(f"species head {species_head!r} not in {SPECIES_HEADS}")
  return max_z + 1 if species_head == "classes" else 2


def class_max(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The maximum of `logits` (..., C) over the classes and (int32) the first class holding it, no
  gradient: one native pass on the CPU (XLA's reduction of both took 3% of the paper model's
  CPU step), else jnp."""
  if logits.dtype == jnp.float32 and kernels.on_cpu():
    return kernels.class_max(logits)
  logits = lax.stop_gradient(logits)
  return jnp.max(logits, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def species_grid(outputs: jax.Array, species_head: str, max_z: int) -> jax.Array:
  """Segmentation outputs (..., C) -> int32 species grid (...), 0 = no atom (jnp or numpy in)."""
  outputs = jnp.asarray(outputs)
  if species_head == "classes":
    return class_max(outputs)[1]
  if species_head != "mask_z":
    raise ValueError(f"species head {species_head!r} not in {SPECIES_HEADS}")
  z = jnp.clip(jnp.round(outputs[..., 1] * Z_SCALE), 1, max_z).astype(jnp.int32)
  return jnp.where(outputs[..., 0] > 0, z, 0)


class Conv3D(nn.Module):
  """`nn.Conv` for 3-D inputs with a choice of implementation; same parameters and outputs."""

  features: int
  kernel_size: int
  strides: int = 1
  padding: str = "SAME"
  impl: str = "auto"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True  # False before BatchNorm, which cancels a bias (its gradient is 0).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(),
        (self.kernel_size,) * 3 + (x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = convolution.conv3d(x, kernel, (self.strides,) * 3, self.padding, self.impl)
    if not self.use_bias:
      return y
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    return ops.add_bias(y, bias.astype(y.dtype))


@jax.custom_vjp
def scale_gradient(x: jax.Array, scale: jax.Array | float) -> jax.Array:
  """Identity whose backward pass multiplies the cotangent by `scale` (no gradient to `scale`)."""
  del scale
  return x


def _scale_gradient_fwd(x, scale):
  return x, scale


def _scale_gradient_bwd(scale, cotangent):
  return (cotangent * jnp.asarray(scale, cotangent.dtype), jnp.zeros_like(scale))


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over all but the last axis (the same variables, statistics and outputs; its
  defaults: momentum 0.99, epsilon 1e-5), with a hand-written backward pass whose per-channel
  sums, like the forward statistics, take one pass each (`native.ops.batch_norm`)."""

  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = self.param("scale", nn.initializers.ones_init(), features, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), features, jnp.float32)
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      y = (x32 - ra_mean.value) * (scale * lax.rsqrt(ra_var.value + self.epsilon)) + bias
    else:
      y, mean, var = ops.batch_norm(x32, scale, bias, self.epsilon)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype or jnp.float32)


def _check_condition(conditional: bool, condition: jax.Array | None) -> None:
  if conditional and condition is None:
    raise ValueError("conditional model needs a per-sample `condition` (B,)")
  if not conditional and condition is not None:
    raise ValueError("`condition` given to an unconditional model (set model.conditional)")


class Encoder(nn.Module):
  """Density (B, G, G, G) -> latent mean and log-variance, each (B, latent_dim), float32.

  Paper appendix: Conv3D k5 s2 16, k3 s1 32, k3 s1 64, k3 s2 128 (SAME), each followed by
  BatchNorm and LeakyReLU, then flatten and Dense heads. If `conditional`, the flattened features
  are multiplied by the per-sample `condition` before the heads. If `reads_composition`, the
  crystal's composition (fractions per Z) enters the mean and log-variance through Dense layers
  that start at zero (a trained encoder's latent is unchanged until they learn).
  """

  latent_dim: int
  features: Sequence[int]
  kernels: Sequence[int]
  strides: Sequence[int]
  conditional: bool = False
  reads_composition: bool = False
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, density: jax.Array, *, train: bool, condition: jax.Array | None = None,
      composition: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    _check_condition(self.conditional, condition)
    if self.reads_composition != (composition is not None):
      raise ValueError("an encoder that reads the composition needs one (fractions per Z), and"
                       " only such an encoder takes one")
    x = density[..., None].astype(self.dtype)
    for features, kernel, stride in zip(self.features, self.kernels, self.strides, strict=True):
      x = Conv3D(features, kernel, stride, "SAME", self.conv_impl, self.dtype, use_bias=False)(x)
      x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
      x = nn.leaky_relu(x)
    x = x.reshape(x.shape[0], -1)
    if self.conditional:
      x = x * condition[:, None].astype(x.dtype)
    mean = nn.Dense(self.latent_dim, dtype=jnp.float32, name="mean")(x)
    logvar = nn.Dense(self.latent_dim, dtype=jnp.float32, name="logvar")(x)
    if self.reads_composition:
      composition = composition.astype(jnp.float32)
      zeros = nn.initializers.zeros
      mean = mean + nn.Dense(self.latent_dim, kernel_init=zeros, name="composition_mean")(
          composition)
      logvar = logvar + nn.Dense(self.latent_dim, kernel_init=zeros, name="composition_logvar")(
          composition)
    return mean, logvar


def decoder_sizes(
    grid: int, start: int, kernels: Sequence[int], paddings: Sequence[str]
) -> tuple[list[int], int]:
  """Cube sides after each upsampling round and the final VALID conv kernel that lands on `grid`."""
  sizes = []
  size = start
  for kernel, padding in zip(kernels, paddings, strict=True):
    size *= 2
    if padding == "VALID":
      size -= kernel - 1
    elif padding != "SAME":
      raise ValueError(f"decoder padding {padding!r} is neither 'SAME' nor 'VALID'")
    if size < 1:
      raise ValueError(f"decoder cube vanishes: sides {sizes + [size]} from start {start}")
    sizes.append(size)
  if size < grid:
    raise ValueError(
        f"decoder cannot reach grid {grid}: start {start}, kernels {tuple(kernels)}, paddings "
        f"{tuple(paddings)} give sides {sizes}; the last must be >= {grid}")
  return sizes, size - grid + 1


class Decoder(nn.Module):
  """Latent (B, L) -> density (B, G, G, G), non-negative, float32.

  Dense -> reshape to start^3 x start_features -> per round: trilinear x2 upsampling, Conv3D,
  LeakyReLU -> Conv3D to 1 channel with the VALID kernel from `decoder_sizes`, then `output`
  (ReLU as in the paper, or softplus, which never stops the gradient of a voxel predicted
  empty). If `conditional`, the Dense output is multiplied by the per-sample `condition`.
  """

  grid: int
  start: int
  start_features: int
  features: Sequence[int]
  kernels: Sequence[int]
  paddings: Sequence[str]
  output: str = "relu"
  conditional: bool = False
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, *, condition: jax.Array | None = None) -> jax.Array:
    if self.output not in DECODER_OUTPUTS:
      raise ValueError(f"decoder output {self.output!r} not in {DECODER_OUTPUTS}")
    _check_condition(self.conditional, condition)
    _, final_kernel = decoder_sizes(self.grid, self.start, self.kernels, self.paddings)
    x = nn.Dense(self.start ** 3 * self.start_features, dtype=self.dtype)(z)
    if self.conditional:
      x = x * condition[:, None].astype(x.dtype)
    x = x.reshape(z.shape[0], self.start, self.start, self.start, self.start_features)
    for features, kernel, padding in zip(self.features, self.kernels, self.paddings, strict=True):
      x = ops.resize(x, [2 * side for side in x.shape[1:4]])
      x = Conv3D(features, kernel, 1, padding, self.conv_impl, self.dtype)(x)
      x = nn.leaky_relu(x)
    x = Conv3D(1, final_kernel, 1, "VALID", self.conv_impl, self.dtype)(x)[..., 0]
    activation = nn.relu if self.output == "relu" else nn.softplus
    return activation(x.astype(jnp.float32))


class ConvBlock(nn.Module):
  """Two (Conv3D k3 SAME, BatchNorm, ReLU)."""

  features: int
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for _ in range(2):
      x = Conv3D(self.features, 3, 1, "SAME", self.conv_impl, self.dtype, use_bias=False)(x)
      x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
      x = nn.relu(x)
    return x


class AttentionGate(nn.Module):
  """Additive attention gate (Oktay et al. 2018) on a skip connection.

  skip (B, D, H, W, Cs) is projected by a k2 s2 SAME conv to the gating signal's resolution
  ceil(D/2) (the coarser level, reached by SAME max-pooling), gate (B, ceil(D/2), .., Cg) by a
  1x1 conv; alpha = sigmoid(psi(relu(sum))) is resized trilinearly back to (D, H, W).
  Returns (skip * alpha, alpha); alpha (B, D, H, W, 1) lies in [0, 1].
  """

  features: int
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, skip: jax.Array, gate: jax.Array) -> tuple[jax.Array, jax.Array]:
    theta = Conv3D(self.features, 2, 2, "SAME", self.conv_impl, self.dtype, name="theta")(skip)
    phi = Conv3D(self.features, 1, 1, "SAME", self.conv_impl, self.dtype, name="phi")(gate)
    psi = Conv3D(1, 1, 1, "SAME", self.conv_impl, self.dtype, name="psi")(nn.relu(theta + phi))
    alpha = ops.resize(nn.sigmoid(psi), skip.shape[1:4])
    return skip * alpha, alpha


class AttentionUNet(nn.Module):
  """3-D attention U-Net: density (B, G, G, G) -> outputs (B, G, G, G, num_outputs), float32.

  Down: ConvBlock per level, SAME max-pooling x2 between levels (30 -> 15 -> 8 -> 4). Up: the
  coarser tensor is resized trilinearly to the skip's shape (so odd sides work), concatenated
  with the attention-gated skip (gated by the coarser tensor) and passed through a ConvBlock.
  """

  features: Sequence[int]
  num_outputs: int
  conv_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, density: jax.Array, *, train: bool) -> jax.Array:
    x = density[..., None].astype(self.dtype)
    skips = []
    for level, features in enumerate(self.features):
      if level:
        x = ops.max_pool2(x)
      x = ConvBlock(features, self.conv_impl, self.dtype)(x, train=train)
      skips.append(x)
    for level in reversed(range(len(self.features) - 1)):
      skip = skips[level]
      gated, _ = AttentionGate(self.features[level], self.conv_impl, self.dtype)(skip, x)
      x = jnp.concatenate([gated, ops.resize(x, skip.shape[1:4])], axis=-1)
      x = ConvBlock(self.features[level], self.conv_impl, self.dtype)(x, train=train)
    outputs = Conv3D(self.num_outputs, 1, 1, "SAME", self.conv_impl, self.dtype)(x)
    return outputs.astype(jnp.float32)


class LatticeHead(nn.Module):
  """MLP latent (B, L) -> (B, 3, 3): the lattice vectors (rows, Å) as they lie in the cube, i.e.
  rotated like the decoded atoms (a unit cell is placed with a random rotation), starting near
  `initial_length` times the identity. Predicting the oriented lattice, not only a, b, c, α, β, γ,
  is what lets atoms decoded in any orientation (e.g. random draws) be placed in the cell."""

  hidden: Sequence[int]
  initial_length: float = 5.0

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    x = z
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    bias = self.initial_length * jnp.eye(3, dtype=jnp.float32).reshape(9)
    return nn.Dense(9, bias_init=lambda *_: bias)(x).reshape(-1, 3, 3)


def _mlp(z: jax.Array, hidden: Sequence[int], outputs: int, dropout_rate: float,
         deterministic: bool) -> jax.Array:
  """GELU MLP with dropout on the hidden layers; its Dense layers belong to the calling module."""
  x = z
  for width in hidden:
    x = nn.Dropout(dropout_rate, deterministic=deterministic)(nn.gelu(nn.Dense(width)(x)))
  return nn.Dense(outputs)(x)


class _CompositionMember(nn.Module):
  """One member of a `CompositionHead` ensemble."""

  hidden: Sequence[int]
  outputs: int
  dropout_rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    return _mlp(z, self.hidden, self.outputs, self.dropout_rate, self.deterministic)


class CompositionHead(nn.Module):
  """MLP latent (B, L) -> (B, max_z + 1) logits of the cell's composition: softmax = the fraction
  of the cell's atoms that are each element (index Z; 0 is never a target). The decoded density
  says where atoms are and roughly how heavy (its peaks blur); this head says which elements.

  With `members` > 1, an ensemble of that many MLPs (parameters stacked on a leading axis under
  `members/`) whose logits are the log of their softmaxes' mean: fitted one by one on the frozen
  latent (`head_fit.fit_composition_head`), 8 members got 68.7% of perov_5's validation
  compositions exact against 58.5-61.1% for each alone, on the 3,100-step GPU model's latent
  (README)."""

  hidden: Sequence[int]
  max_z: int
  dropout_rate: float = 0.0  # of the hidden layers with `train` (a head fitted on its own)
  members: int = 1

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    if self.members == 1:
      return _mlp(z, self.hidden, self.max_z + 1, self.dropout_rate, not train)
    ensemble = nn.vmap(_CompositionMember, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True}, in_axes=None,
                       axis_size=self.members)
    logits = ensemble(tuple(self.hidden), self.max_z + 1, self.dropout_rate, not train,
                      name="members")(z)  # (members, B, max_z + 1)
    return jax.nn.logsumexp(jax.nn.log_softmax(logits), axis=0) - jnp.log(self.members)


class PropertyHead(nn.Module):
  """MLP latent mean (B, L) -> (B, P) numeric properties in their own units: the MLP predicts
  each property standardised by the training split's mean and standard deviation (`means`,
  `stds`, set by `train.with_property_scaling`), which it then undoes."""

  hidden: Sequence[int]
  means: Sequence[float]
  stds: Sequence[float]
  dropout_rate: float = 0.0  # of the hidden layers with `train` (a head fitted on its own)

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    standardised = _mlp(z, self.hidden, len(self.means), self.dropout_rate, not train)
    return jnp.asarray(self.means, jnp.float32) + jnp.asarray(self.stds, jnp.float32) * standardised


class CrystalVAE(nn.Module):
  """β-VAE (Encoder, Decoder) + AttentionUNet segmenter (+ optional LatticeHead).

  `__call__` samples z = mean + exp(logvar / 2) * eps (eps from `key`) and segments
  scale_gradient(recon, unet_grad_scale): minimising MSE + β KL + CE with unet_grad_scale = γ
  gives the U-Net dCE only and the decoder (and encoder) MSE + β KL + γ dCE, the paper's routing.
  With `teacher_forcing` the U-Net also segments the true density (`segmented_true`), so it
  learns from clean input while the decoder is still poor. The lattice head reads z. With
  `composition_head` the encoder also reads the crystal's composition (fractions per Z) and a
  head reads it back from the latent (the mean in training, z when decoding), so that the
  latent carries the elements, which the blurred decoded density cannot tell apart (its peaks
  give Z only to a few units). With `properties` (names of numeric dataset properties) a
  `PropertyHead` predicts them from the latent mean. Without `segmenter` there is no U-Net:
  the outputs hold no `segmented`, and atoms are read off the decoded density alone.
  """

  # Every field is set by `model_from_config` (config.model; grid from config.voxel, max_z from
  # config.dataset); the defaults are in configs/default.py.
  grid: int
  max_z: int
  latent_dim: int
  encoder_features: Sequence[int]
  encoder_kernels: Sequence[int]
  encoder_strides: Sequence[int]
  decoder_start: int
  decoder_features: Sequence[int]
  decoder_kernels: Sequence[int]
  decoder_paddings: Sequence[str]
  decoder_output: str
  unet_features: Sequence[int]
  segmenter: bool
  species_head: str
  lattice_head: bool
  lattice_hidden: Sequence[int]
  composition_head: bool
  composition_hidden: Sequence[int]
  composition_members: int
  properties: Sequence[str]
  property_hidden: Sequence[int]
  property_means: Sequence[float]
  property_stds: Sequence[float]
  conditional: bool
  conv_impl: str
  dtype: Any

  def setup(self):
    self.encoder = Encoder(
        self.latent_dim, self.encoder_features, self.encoder_kernels, self.encoder_strides,
        self.conditional, self.composition_head, self.conv_impl, self.dtype)
    self.decoder = Decoder(
        self.grid, self.decoder_start, self.encoder_features[-1], self.decoder_features,
        self.decoder_kernels, self.decoder_paddings, self.decoder_output, self.conditional,
        self.conv_impl, self.dtype)
    if self.segmenter:
      self.unet = AttentionUNet(self.unet_features,
                                segmenter_channels(self.species_head, self.max_z),
                                self.conv_impl, self.dtype)
    if self.lattice_head:
      self.lattice = LatticeHead(self.lattice_hidden)
    if self.composition_head:
      self.composition = CompositionHead(self.composition_hidden, self.max_z,
                                         members=self.composition_members)
    if self.properties:
      if not len(self.properties) == len(self.property_means) == len(self.property_stds):
        raise ValueError(f"properties {tuple(self.properties)} need one mean and standard "
                         "deviation each (model.property_means / property_stds, set from the "
                         "training split by train.py)")
      self.property = PropertyHead(self.property_hidden, self.property_means, self.property_stds)

  def encode(
      self, density: jax.Array, *, train: bool, condition: jax.Array | None = None,
      composition: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    return self.encoder(density, train=train, condition=condition, composition=composition)

  def decode(
      self, z: jax.Array, *, train: bool, condition: jax.Array | None = None) -> jax.Array:
    del train  # The decoder has no batch statistics; the flag keeps the API uniform.
    return self.decoder(z, condition=condition)

  def segment(self, density: jax.Array, *, train: bool) -> jax.Array:
    """Segmentation outputs of the species head (see the module docstring)."""
    if not self.segmenter:
      raise ValueError("model built without a segmenter (model.segmenter=False): its atoms are"
                       " read off the decoded density (eval.atoms_from=density)")
    return self.unet(density, train=train)

  def segment_species(self, density: jax.Array) -> jax.Array:
    """The int32 species grid (B, G, G, G) of a density, 0 = no atom (inference)."""
    return species_grid(self.segment(density, train=False), self.species_head, self.max_z)

  def predict_lattice(self, z: jax.Array) -> jax.Array:
    if not self.lattice_head:
      raise ValueError("model built without a lattice head (set model.lattice_head)")
    return self.lattice(z)

  def predict_composition(self, z: jax.Array) -> jax.Array:
    """Composition logits (B, max_z + 1); softmax = fraction of the cell's atoms per element."""
    if not self.composition_head:
      raise ValueError("model built without a composition head (set model.composition_head)")
    return self.composition(z)

  def predict_properties(self, z: jax.Array) -> jax.Array:
    """The properties (B, P) in their own units, in the order of `properties`."""
    if not self.properties:
      raise ValueError("model built without a property head (set model.properties)")
    return self.property(z)

  def __call__(
      self,
      density: jax.Array,
      key: jax.Array,
      *,
      train: bool,
      unet_grad_scale: jax.Array | float = 1.0,
      condition: jax.Array | None = None,
      composition: jax.Array | None = None,
      teacher_forcing: bool = False,
  ) -> dict[str, jax.Array]:
    mean, logvar = self.encode(density, train=train, condition=condition,
                               composition=composition)
    z = mean + jnp.exp(logvar / 2) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = self.decode(z, train=train, condition=condition)
    outputs = dict(mean=mean, logvar=logvar, z=z, recon=recon)
    if self.segmenter:
      outputs["segmented"] = self.segment(scale_gradient(recon, unet_grad_scale), train=train)
      if teacher_forcing:  # the U-Net also segments the true density (its gradient: U-Net only)
        outputs["segmented_true"] = self.segment(density, train=train)
    if self.lattice_head:
      outputs["lattice"] = self.predict_lattice(z)
    if self.composition_head:  # from the mean: the head reads the latent's noise-free part
      outputs["composition"] = self.predict_composition(mean)
    if self.properties:
      outputs["properties"] = self.predict_properties(mean)
    return outputs


# The fields of `CrystalVAE` that `config.model` sets (grid and max_z come from config.voxel and
# config.dataset).
_MODEL_FIELDS = tuple(field.name for field in dataclasses.fields(CrystalVAE)
                      if field.name not in ("grid", "max_z", "parent", "name"))


def init_variables(config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
  """The initial variables (`params`, `batch_stats`) of `model_from_config(config)`."""
  model = model_from_config(config)
  grid = config.voxel.grid
  density = jnp.zeros((1, grid, grid, grid), jnp.float32)
  params_rng, sample_rng = jax.random.split(rng)
  # Parameters draw from an "rbg" key made from the threefry one: XLA compiles its random-bit
  # generator for the model's ~100 parameter tensors several times faster (3 s vs 15 s on CPU).
  params_rng = jax.random.wrap_key_data(jnp.tile(jax.random.key_data(params_rng), 2), impl="rbg")
  condition = jnp.ones((1,), jnp.float32) if config.model.conditional else None
  composition = (jnp.zeros((1, config.dataset.max_z + 1), jnp.float32)
                 if config.model.composition_head else None)
  init = jax.jit(functools.partial(model.init, train=False))
  return dict(init(params_rng, density, sample_rng, condition=condition,
                   composition=composition))


class ModelConfigError(ValueError):
  """A config.model value the model cannot be built with (the command line says it in one line)."""


def _check_choices(model: ml_collections.ConfigDict) -> None:
  for field, choices in (("conv_impl", convolution.CONV_IMPLS), ("species_head", SPECIES_HEADS),
                         ("decoder_output", DECODER_OUTPUTS)):
    if model[field] not in choices:
      raise ModelConfigError(f"model.{field} {model[field]!r} not in {choices}")
  if model.conv_impl == "fft" and any(stride != 1 for stride in model.encoder_strides):
    raise ModelConfigError(
        f"model.conv_impl 'fft' has stride 1 only and the encoder's strides are "
        f"{tuple(model.encoder_strides)}; 'auto' takes the fft where it is faster")
  if model.conv_impl == "native" and not kernels.available():
    raise ModelConfigError("model.conv_impl 'native' could not be built (see the warning above); "
                           "'auto' falls back to XLA's formulations")


def model_from_config(config: ml_collections.ConfigDict) -> CrystalVAE:
  """Builds `CrystalVAE` from config.model, config.voxel.grid and config.dataset.max_z."""
  _check_choices(config.model)
  values = {name: config.model[name] for name in _MODEL_FIELDS}
  values = {name: tuple(value) if isinstance(value, (list, tuple)) else value
            for name, value in values.items()}
  values["dtype"] = jnp.dtype(values["dtype"])
  return CrystalVAE(grid=config.voxel.grid, max_z=config.dataset.max_z, **values)