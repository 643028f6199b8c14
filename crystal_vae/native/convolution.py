"""3-D convolution back-ends and the speed rules that choose between them per layer.

`conv3d` is the model's convolution (channels-last, no bias), one of:
  xla        lax.conv_general_dilated (the fast path on GPU);
  depth_sum  a sum over kernel depth of 2-D convolutions (`_conv_depth_sum`);
  fft        stride 1, through the FFT with a hand-written gradient (`_conv_fft`);
  native     the direct convolution of the C++ kernels (`kernels.conv`), CPU only;
  auto       'xla' off the CPU; on the CPU the fastest of the others by `prefers_native` and
             `prefers_fft`, measured with launch/benchmarks/benchmark_conv.py.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from crystal_vae.native import kernels

Padding = Sequence[tuple[int, int]]
CONV_IMPLS = ("auto", "xla", "depth_sum", "fft", "native")


def _conv_xla(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Padding) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, strides, pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _conv_depth_sum(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Padding) -> jax.Array:
  """3-D convolution as a sum over kernel depth of 2-D convolutions over (H, W).

  Output depth d sees input depth s*d + kd through kernel slice kd; for each kd the strided input
  depth slice is folded into the batch axis and convolved in 2-D. On CPU, XLA's 3-D convolutions
  of the paper model are 2-7x slower than this at stride 1 and 30-200x at stride 2, on par only
  for the 20^3 VALID k5 and 1-channel output layers (launch/benchmarks/benchmark_conv.py).
  """
  batch, _, height, width, channels = x.shape
  x = jnp.pad(x, ((0, 0), pads[0], (0, 0), (0, 0), (0, 0)))
  out_depth = (x.shape[1] - kernel.shape[0]) // strides[0] + 1
  end = strides[0] * (out_depth - 1) + 1
  total = None
  for kd in range(kernel.shape[0]):
    depth_slice = x[:, kd:kd + end:strides[0]]
    y = lax.conv_general_dilated(
        depth_slice.reshape(batch * out_depth, height, width, channels), kernel[kd], strides[1:],
        pads[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    total = y if total is None else total + y
  return total.reshape(batch, out_depth, *total.shape[1:])


_SPATIAL = (2, 3, 4)  # of a channels-first (B, C, D, H, W) array


def _dft_rows(length: int, taps: int, sign: float) -> np.ndarray:
  """(taps, length) complex64: exp(sign * 2*pi*i * t * f / length)."""
  phase = sign * 2j * np.pi * np.outer(np.arange(taps), np.arange(length)) / length
  return np.exp(phase).astype(np.complex64)


def _half_spectrum_weights(length: int) -> np.ndarray:
  """How often each stored frequency of a real signal's rfft counts in the full inverse sum."""
  weights = np.full(length // 2 + 1, 2.0)
  weights[0] = 1.0
  if length % 2 == 0:
    weights[-1] = 1.0
  return weights


def _along_last_three(array: jax.Array, matrices: Sequence[np.ndarray],
                      minor_first: bool = False) -> jax.Array:
  """`array` (..., n0, n1, n2) with matrix i (m_i, n_i) applied along axis -3 + i."""
  order = (2, 1, 0) if minor_first else (0, 1, 2)
  for axis in order:
    array = jnp.moveaxis(jnp.tensordot(array, matrices[axis], axes=([axis - 3], [1])), -1, axis - 3)
  return array


def _kernel_spectrum(kernel: jax.Array, lengths: Sequence[int]) -> jax.Array:
  """rfftn over the last three axes of `kernel` (..., kd, kh, kw) zero-padded to `lengths`,
  as three small DFTs over its few taps (an FFT of the padded kernel costs as much as the
  input's)."""
  matrices = [_dft_rows(length, taps, -1.0).T for length, taps in zip(lengths, kernel.shape[-3:])]
  matrices[2] = matrices[2][:lengths[2] // 2 + 1]
  return _along_last_three(kernel.astype(jnp.complex64), matrices)


def _first_samples(spectrum: jax.Array, lengths: Sequence[int], taps: Sequence[int]
                   ) -> jax.Array:
  """The real inverse of an rfftn `spectrum` (..., L0, L1, L2 // 2 + 1) at [0, taps) per axis,
  as three small inverse DFTs (the full inverse would transform every channel at every lag)."""
  matrices = [_dft_rows(length, count, 1.0) for length, count in zip(lengths, taps)]
  half = lengths[2] // 2 + 1
  matrices[2] = matrices[2][:, :half] * _half_spectrum_weights(lengths[2]).astype(np.complex64)
  return jnp.real(_along_last_three(spectrum, matrices, minor_first=True)) / np.prod(lengths)


def _fft_forward(x: jax.Array, kernel: jax.Array, pads: tuple[tuple[int, int], ...]
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  padded = jnp.pad(jnp.transpose(x, (0, 4, 1, 2, 3)).astype(jnp.float32),
                   ((0, 0), (0, 0), *pads))
  lengths = padded.shape[2:]
  out = [length - taps + 1 for length, taps in zip(lengths, kernel.shape[:3])]
  spectrum_x = jnp.fft.rfftn(padded, axes=_SPATIAL)                           # B, C, F
  spectrum_k = _kernel_spectrum(jnp.transpose(kernel, (3, 4, 0, 1, 2)), lengths)  # C, O, F
  # y[p] = sum_t x[p + t] k[t]: a circular cross-correlation over the padded cube, which never
  # wraps because the output stops `taps - 1` short of the padded side.
  spectrum_y = jnp.sum(spectrum_x[:, :, None] * jnp.conj(spectrum_k)[None], axis=1)
  y = jnp.fft.irfftn(spectrum_y, s=lengths, axes=_SPATIAL)[:, :, :out[0], :out[1], :out[2]]
  return jnp.transpose(y, (0, 2, 3, 4, 1)).astype(x.dtype), (spectrum_x, spectrum_k, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fft_conv(x: jax.Array, kernel: jax.Array, pads: tuple[tuple[int, int], ...]) -> jax.Array:
  return _fft_forward(x, kernel, pads)[0]


def _fft_conv_bwd(pads, residuals, cotangent):
  spectrum_x, spectrum_k, kernel = residuals
  taps = kernel.shape[:3]
  lengths = [out + count - 1 for out, count in zip(cotangent.shape[1:4], taps)]
  spectrum_g = jnp.fft.rfftn(jnp.transpose(cotangent, (0, 4, 1, 2, 3)).astype(jnp.float32),
                             s=lengths, axes=_SPATIAL)                        # B, O, F
  # dx[q] = sum_t g[q - t] k[t] (a circular convolution: the zero-padded g never wraps), then
  # the padding cut off; dk[t] = sum over batch and p of x[p + t] g[p] (a cross-correlation).
  spectrum_dx = jnp.sum(spectrum_g[:, None] * spectrum_k[None], axis=2)      # B, C, F
  dx = jnp.fft.irfftn(spectrum_dx, s=lengths, axes=_SPATIAL)
  dx = dx[(slice(None), slice(None)) + tuple(slice(low, length - high)
                                             for (low, high), length in zip(pads, lengths))]
  cross = jnp.sum(spectrum_x[:, :, None] * jnp.conj(spectrum_g)[:, None], axis=0)  # C, O, F
  dkernel = _first_samples(cross, lengths, taps)
  return (jnp.transpose(dx, (0, 2, 3, 4, 1)).astype(cotangent.dtype),
          jnp.transpose(dkernel, (2, 3, 4, 0, 1)).astype(kernel.dtype))


_fft_conv.defvjp(_fft_forward, _fft_conv_bwd)


def _conv_fft(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Padding) -> jax.Array:
  """Stride-1 3-D convolution through the FFT: y = irfftn(rfftn(x) conj(rfftn(k))) summed over
  input channels, in float32; its gradients are the same products with the cotangent's spectrum
  (a custom VJP that keeps the input's spectrum and reads the kernel gradient's few lags off
  with small DFTs). Per output voxel it multiplies C_in x C_out complex numbers instead of
  k^3 x C_in x C_out reals, which wins on CPU for big cubes with few channels (`prefers_fft`).
  Reverse-mode differentiable only (a custom VJP)."""
  if any(stride != 1 for stride in strides):
    raise ValueError(f"the fft convolution has stride 1 only, not {strides}")
  return _fft_conv(x, kernel, tuple(tuple(int(p) for p in pad) for pad in pads))


def prefers_fft(padded_sides: Sequence[int], kernel_shape: Sequence[int],
                strides: Sequence[int]) -> bool:
  """Whether the FFT convolution beats `depth_sum` on CPU (launch/benchmarks/benchmark_conv.py,
  forward + both gradients, batch 8): stride 1, a padded cube of side >= 16 and either at most 8
  input or output channels (XLA's 2-D convolutions are slow there: 1.4-4x faster) or a kernel of
  side >= 4 with at most 16 (k^3 taps against the FFT's one product per frequency: 1.4x); with
  more channels or smaller cubes the FFT's transforms cost more than they save (0.1-0.8x)."""
  *taps, channels_in, channels_out = kernel_shape
  fewest = min(channels_in, channels_out)
  return (all(stride == 1 for stride in strides) and min(padded_sides) >= 16
          and (fewest <= 8 or (min(taps) >= 4 and fewest <= 16)))


def prefers_native(padded_sides: Sequence[int], kernel_shape: Sequence[int],
                   strides: Sequence[int]) -> bool:
  """Whether the native direct convolution (`kernels.conv`) beats XLA's formulations on CPU
  (launch/benchmarks/benchmark_conv.py, forward + both gradients, batch 8, and whole train
  steps): one stride for all axes, a padded cube of side >= 10 at stride 1 (>= 12 at larger
  strides) and 1 or >= 8 input and output channels (its vectors hold 8 channels; a few more are
  padded up to 8): 1.1-3.5x faster than the best XLA formulation on such layers (the paper
  decoder's first, 10^3 x 128 -> 64 k5: 228 against 296 ms; the first encoder layer, 30^3 x 1 ->
  16 at stride 2: 3.6 ms for forward and kernel gradient); the 8^3 levels at stride 1 took 2-3%
  off whole steps; on smaller cubes `depth_sum` is up to 2x faster."""
  *_, channels_in, channels_out = kernel_shape
  return (len(set(strides)) == 1 and min(padded_sides) >= (10 if strides[0] == 1 else 12)
          and (channels_in == 1 or channels_in >= 8) and (channels_out == 1 or channels_out >= 8))


def conv3d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: str,
    impl: str = "auto",
) -> jax.Array:
  """Channels-last 3-D convolution, x (B, D, H, W, C), kernel (kd, kh, kw, C, F), no bias.

  impl: 'xla' (lax.conv_general_dilated, the fast path on GPU), 'depth_sum' (see
  `_conv_depth_sum`), 'fft' (stride 1, see `_conv_fft`), 'native' (CPU, one stride for all
  axes, a direct convolution compiled on first use, see `kernels`), or 'auto': 'xla' off the
  CPU; on the CPU 'native' where `prefers_native` says so and it could be built, else 'fft'
  where `prefers_fft` says so, else 'depth_sum'.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl {impl!r} not in {CONV_IMPLS}")
  strides = tuple(strides)
  pads = lax.padtype_to_pads(x.shape[1:4], kernel.shape[:3], strides, padding)
  if impl == "auto":
    impl = _auto_impl(x.shape[1:4], pads, kernel.shape, strides)
  if impl == "native":
    if len(set(strides)) != 1 or jax.default_backend() != "cpu":
      raise ValueError(f"the native convolution runs on the CPU with one stride for all axes, "
                       f"not strides {strides} on {jax.default_backend()}")
    return kernels.conv(x, kernel, pads, strides[0])
  conv = {"xla": _conv_xla, "depth_sum": _conv_depth_sum, "fft": _conv_fft}[impl]
  return conv(x, kernel, strides, pads)


def _auto_impl(sides: Sequence[int], pads: Padding, kernel_shape: Sequence[int],
               strides: tuple[int, ...]) -> str:
  if jax.default_backend() != "cpu":
    return "xla"
  padded = [side + low + high for side, (low, high) in zip(sides, pads)]
  if prefers_native(padded, kernel_shape, strides) and kernels.available():
    return "native"
  return "fft" if prefers_fft(padded, kernel_shape, strides) else "depth_sum"
