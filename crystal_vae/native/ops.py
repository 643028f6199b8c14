"""The layers' array operations that run on the native kernels on the CPU and on XLA elsewhere.

Each gives the values (and gradients) of its XLA formulation, tested against it: trilinear
resizing (`resize`), 2x2x2 max pooling (`max_pool2`), the per-channel sums behind batch
normalisation (`channel_sums`), a bias with a one-pass gradient (`add_bias`) and batch
normalisation with a hand-written backward pass (`batch_norm`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from crystal_vae.native import kernels


def resize(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
  """Trilinear resize of a (B, D, H, W, C) array to the given (D, H, W); on the CPU, doubling
  every side, by the native kernel (the same values: `kernels.upsample2`)."""
  doubles = all(size == 2 * side for size, side in zip(spatial, x.shape[1:4]))
  if doubles and kernels.on_cpu():
    return kernels.upsample2(x)
  return jax.image.resize(x, (x.shape[0], *spatial, x.shape[-1]), "trilinear")


def max_pool2(x: jax.Array) -> jax.Array:
  """nn.max_pool over 2x2x2 windows at stride 2, 'SAME'; on the CPU by the native kernel (XLA's
  gradient of a max pool there builds index arrays: ~130 ms of the paper model's step)."""
  if kernels.on_cpu():
    return kernels.max_pool2(x)
  return nn.max_pool(x, (2, 2, 2), (2, 2, 2), "SAME")


def channel_sums(a: jax.Array, b: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The sums of `a` and of `a * (b - shift)` over all but the last axis (float32 in): one
  native pass on the CPU (XLA's reductions to a few channels are slow there), else jnp."""
  if kernels.on_cpu():
    sums = kernels.channel_sums(a, b, shift)
    return sums[0], sums[1]
  axes = tuple(range(a.ndim - 1))
  return jnp.sum(a, axes), jnp.sum(a * (b - shift), axes)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias (per last-axis channel); the bias gradient, the cotangent summed over all voxels, by
  `channel_sums` (XLA's reduction to the U-Net's 101 channels took 3% of the paper model's CPU
  step)."""
  return y + bias


def _add_bias_forward(y, bias):
  return y + bias, None


def _add_bias_backward(_, cotangent):
  g = cotangent.astype(jnp.float32)
  return cotangent, channel_sums(g, g, jnp.zeros(g.shape[-1], g.dtype))[0].astype(cotangent.dtype)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch normalisation of float32 `x` over all but the last axis: (y, mean, var),
  var = E[x^2] - E[x]^2 clipped at 0 (flax's fast variance)."""
  return _batch_norm_forward(x, scale, bias, epsilon)[0]


def _batch_norm_forward(x, scale, bias, epsilon):
  count = x.size // x.shape[-1]
  total, squares = channel_sums(x, x, jnp.zeros(x.shape[-1], x.dtype))
  mean = total / count
  var = jnp.maximum(squares / count - mean ** 2, 0.0)
  rstd = lax.rsqrt(var + epsilon)
  return ((x - mean) * (scale * rstd) + bias, mean, var), (x, scale, mean, rstd)


def _batch_norm_backward(epsilon, residuals, cotangents):
  del epsilon
  x, scale, mean, rstd = residuals
  g, g_mean, g_var = cotangents
  count = x.size // x.shape[-1]
  g_sum, g_centred = channel_sums(g, x, mean)  # sum g, sum g (x - mean)
  centred = x - mean
  dx = (scale * rstd * (g - g_sum / count - centred * (rstd ** 2 * g_centred / count))
        + (g_mean + 2.0 * g_var * centred) / count)
  return dx, g_centred * rstd, g_sum


batch_norm.defvjp(_batch_norm_forward, _batch_norm_backward)
