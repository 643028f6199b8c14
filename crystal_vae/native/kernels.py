"""CPU kernels of the model: `kernels.cc`, compiled on first use.

The C++ file beside this one holds XLA FFI handlers (channels-last, float32): a direct 3-D
correlation (one stride for all axes), its kernel and input gradients, trilinear x2
upsampling with its adjoint, 2x2x2 max pooling with its adjoint, the per-channel sums of
batch normalisation, the class maximum, and Adam's step (with the sum of squares behind
gradient clipping).
`available()` compiles it once per source, jaxlib and CPU into a cache folder
(`$CRYSTAL_VAE_CACHE`, else `~/.cache/crystal_vae`) with the C++ compiler in `$CXX` or on the
PATH, loads it and registers the handlers with JAX. Where that fails (no compiler, say), it logs
why once and `available()` is False: the model then keeps its XLA formulations.
`conv(x, kernel, pads, stride)` is the differentiable convolution (a custom VJP; the padding is
implicit, no padded copy is made; at stride 1 the input gradient is the same correlation on the
cotangent with the flipped kernel),
`upsample2(x)` the differentiable upsampling (jax.image.resize's "trilinear" at twice the sides),
`max_pool2(x)` the differentiable max pooling, `channel_sums(a, b, shift)` the sums behind
`ops.batch_norm`, `adam(...)` the optimiser step behind `adam.apply_gradients`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import pathlib
import shutil
import subprocess
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

_SOURCE = pathlib.Path(__file__).with_name("kernels.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
_TARGETS = {"correlate": "CrystalVaeCorrelate", "kernel_gradient": "CrystalVaeKernelGradient",
            "strided_input_gradient": "CrystalVaeStridedInputGradient",
            "channel_sums": "CrystalVaeChannelSums",
            "max_pool2": "CrystalVaeMaxPool2",
            "max_pool2_transpose": "CrystalVaeMaxPool2Transpose",
            "upsample2": "CrystalVaeUpsample2",
            "upsample2_transpose": "CrystalVaeUpsample2Transpose",
            "class_max": "CrystalVaeClassMax", "adam": "CrystalVaeAdam",
            "sum_of_squares": "CrystalVaeSumOfSquares"}
_LANES = 8  # output channels per vector register (the handlers need 1 or a multiple of this)


def _cpu_signature() -> str:
  """The CPU's model and instruction-set flags (the library is built with -march=native)."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return os.uname().machine
  lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
  return "\n".join(sorted(set(lines)))


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "crystal_vae"
  return pathlib.Path(os.environ.get("CRYSTAL_VAE_CACHE", default))


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build() -> pathlib.Path:
  """Compiles kernels.cc unless a build for this source, jaxlib, compiler and CPU exists; returns
  the library's path. Several processes may build at once: each writes its own file and renames
  it into place."""
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler (set CXX or put g++ on the PATH)")
  key = hashlib.sha256("\n".join([
      _SOURCE.read_text(), importlib.metadata.version("jaxlib"), compiler, " ".join(_FLAGS),
      _cpu_signature()]).encode()).hexdigest()[:16]
  target = _cache_dir() / f"native-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
  command = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", str(partial)]
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  if result.returncode != 0:
    partial.unlink(missing_ok=True)
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()[-2000:]}")
  os.replace(partial, target)
  return target


@functools.cache
def available() -> bool:
  """Whether the CPU kernels are built, loaded and registered (once per process)."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(f"crystal_vae_{name}",
                                  jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
    logging.warning("native CPU kernels unavailable, XLA's formulations instead: %s", error)
    return False
  return True


def on_cpu() -> bool:
  """Whether this runs on the CPU with the kernels built (`available`)."""
  return jax.default_backend() == "cpu" and available()


def _require() -> None:
  if not available():
    raise RuntimeError("the native CPU kernels could not be built (see the log); use "
                       "model.conv_impl 'auto', 'depth_sum', 'fft' or 'xla'")


def _vectors(channels: int) -> int:
  """`channels` rounded up to whole vectors."""
  return -(-channels // _LANES) * _LANES


def _round_up(channels: int) -> int:
  """Output channels as the handlers take them: 1, or whole vectors."""
  return 1 if channels == 1 else _vectors(channels)


Pads = tuple[tuple[int, int], ...]


def _out_sides(sides, taps, pads: Pads, stride: int) -> tuple[int, ...]:
  return tuple((side + low + high - tap) // stride + 1
               for side, tap, (low, high) in zip(sides, taps, pads))


def _lows(pads: Pads) -> np.ndarray:
  return np.array([low for low, _ in pads], np.int64)


def correlate(x: jax.Array, kernel: jax.Array, pads: Pads, stride: int = 1) -> jax.Array:
  """Correlation of float32 `x` (B, D, H, W, C) with `kernel` (kd, kh, kw, C, O), x read as 0
  over `pads` (low, high) around each spatial axis (no padded copy is made):
  y[b, p, o] = sum over taps t and c of x[b, stride * p + t - low, c] kernel[t, c, o]."""
  _require()
  out = kernel.shape[-1]
  kernel = jnp.pad(kernel, ((0, 0),) * 4 + ((0, _round_up(out) - out),))
  shape = (x.shape[0], *_out_sides(x.shape[1:4], kernel.shape[:3], pads, stride),
           kernel.shape[-1])
  y = jax.ffi.ffi_call("crystal_vae_correlate", jax.ShapeDtypeStruct(shape, jnp.float32))(
      x, kernel, stride=np.int64(stride), low=_lows(pads))
  return y[..., :out]


def kernel_gradient(x: jax.Array, cotangent: jax.Array, taps: tuple[int, int, int], pads: Pads,
                    stride: int = 1) -> jax.Array:
  """d(sum y * cotangent) / d kernel of `correlate(x, kernel, pads, stride)`: (kd, kh, kw, C, O)."""
  _require()
  out = cotangent.shape[-1]
  cotangent = jnp.pad(cotangent, ((0, 0),) * 4 + ((0, _round_up(out) - out),))
  shape = (*taps, x.shape[-1], cotangent.shape[-1])
  dk = jax.ffi.ffi_call("crystal_vae_kernel_gradient", jax.ShapeDtypeStruct(shape, jnp.float32))(
      x, cotangent, stride=np.int64(stride), low=_lows(pads))
  return dk[..., :out]


def _input_gradient(cotangent: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...],
                    pads: Pads, stride: int) -> jax.Array:
  """d(sum y * cotangent) / d x of `correlate(x, kernel, pads, stride)`."""
  taps = kernel.shape[:3]
  if stride == 1:
    # dx[q] = sum_t g[q + low - t] k[t]: a correlation of g padded by (taps - 1 - pad) with the
    # kernel flipped in space and transposed in channels.
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], -1, -2)
    return correlate(cotangent, flipped, tuple((k - 1 - low, k - 1 - high)
                                               for k, (low, high) in zip(taps, pads)))
  channels = x_shape[-1]
  kernel = jnp.pad(jnp.swapaxes(kernel, -1, -2),  # (kd, kh, kw, O, C), C padded to a vector
                   ((0, 0),) * 4 + ((0, _vectors(channels) - channels),))
  padded_sides = tuple(side + low + high for side, (low, high) in zip(x_shape[1:4], pads))
  shape = (x_shape[0], *padded_sides, kernel.shape[-1])
  dx = jax.ffi.ffi_call("crystal_vae_strided_input_gradient",
                        jax.ShapeDtypeStruct(shape, jnp.float32))(
                            cotangent, kernel, stride=np.int64(stride))
  return dx[(slice(None),) + tuple(slice(low, side - high) for (low, high), side
                                   in zip(pads, padded_sides)) + (slice(0, channels),)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, pads: Pads, stride: int) -> jax.Array:
  return _conv_forward(x, kernel, pads, stride)[0]


def _conv_forward(x, kernel, pads, stride):
  x32, kernel32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
  return correlate(x32, kernel32, pads, stride).astype(x.dtype), (x32, kernel32)


def _conv_backward(pads, stride, residuals, cotangent):
  x, kernel = residuals
  g = cotangent.astype(jnp.float32)
  dx = _input_gradient(g, kernel, x.shape, pads, stride)
  dk = kernel_gradient(x, g, kernel.shape[:3], pads, stride)
  return dx.astype(cotangent.dtype), dk.astype(kernel.dtype)


_conv.defvjp(_conv_forward, _conv_backward)


def conv(x: jax.Array, kernel: jax.Array, pads: Pads, stride: int = 1) -> jax.Array:
  """Channels-last 3-D convolution (as `lax.conv_general_dilated`: explicit `pads` per spatial
  axis, each between 0 and the kernel's side - 1, the same `stride` along each), float32 inside
  whatever the dtype; reverse-mode differentiable (custom VJP)."""
  pads = tuple((int(low), int(high)) for low, high in pads)
  for taps, (low, high) in zip(kernel.shape[:3], pads):
    if not (0 <= low < taps and 0 <= high < taps):
      raise ValueError(f"native conv pads {pads} outside [0, kernel side {taps})")
  return _conv(x, kernel, pads, int(stride))


@jax.custom_vjp
def max_pool2(x: jax.Array) -> jax.Array:
  """Max pooling of a (B, D, H, W, C) array over 2x2x2 windows at stride 2, 'SAME' (odd sides
  padded after: nn.max_pool(x, (2, 2, 2), (2, 2, 2), "SAME")), float32 inside; the gradient
  goes to the first maximum of each window."""
  return _max_pool2_forward(x)[0]


def _max_pool2_forward(x):
  _require()
  b, d, h, w, c = x.shape
  shape = (b, (d + 1) // 2, (h + 1) // 2, (w + 1) // 2, c)
  y, which = jax.ffi.ffi_call("crystal_vae_max_pool2", (
      jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.uint8)))(
          x.astype(jnp.float32))
  return y.astype(x.dtype), (which, x.shape)


def _max_pool2_backward(residuals, cotangent):
  which, shape = residuals
  dx = jax.ffi.ffi_call("crystal_vae_max_pool2_transpose",
                        jax.ShapeDtypeStruct(shape, jnp.float32))(
                            cotangent.astype(jnp.float32), which)
  return (dx.astype(cotangent.dtype),)


max_pool2.defvjp(_max_pool2_forward, _max_pool2_backward)


def channel_sums(a: jax.Array, b: jax.Array, shift: jax.Array) -> jax.Array:
  """(2, C) float32: the sums of `a` and of `a * (b - shift)` over all but the last axis of the
  float32 arrays `a` and `b` (..., C), in one pass (batch normalisation's statistics and
  gradients)."""
  _require()
  channels = a.shape[-1]
  return jax.ffi.ffi_call("crystal_vae_channel_sums",
                          jax.ShapeDtypeStruct((2, channels), jnp.float32))(
                              a.reshape(-1, channels), b.reshape(-1, channels), shift)


def _upsample_call(name: str, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  _require()
  return jax.ffi.ffi_call(f"crystal_vae_{name}", jax.ShapeDtypeStruct(shape, jnp.float32))(
      x.astype(jnp.float32))


@jax.custom_vjp
def upsample2(x: jax.Array) -> jax.Array:
  """Trilinear x2 upsampling of a (B, D, H, W, C) array (half-pixel centres, clamped edges: the
  values of jax.image.resize(..., "trilinear") to twice the sides), float32 inside."""
  b, d, h, w, c = x.shape
  return _upsample_call("upsample2", x, (b, 2 * d, 2 * h, 2 * w, c)).astype(x.dtype)


def _upsample2_forward(x):
  return upsample2(x), None


def _upsample2_backward(_, cotangent):
  b, d, h, w, c = cotangent.shape  # twice the input's sides, the input's dtype
  shape = (b, d // 2, h // 2, w // 2, c)
  return (_upsample_call("upsample2_transpose", cotangent, shape).astype(cotangent.dtype),)


upsample2.defvjp(_upsample2_forward, _upsample2_backward)


def class_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The maximum over the last axis of float32 `x` (..., C) and (int32) the index of its first
  occurrence: jnp.max and jnp.argmax in one pass (no gradient)."""
  _require()
  rows = x.shape[:-1]
  maxima, indices = jax.ffi.ffi_call(
      "crystal_vae_class_max", (jax.ShapeDtypeStruct((math.prod(rows),), jnp.float32),
                                jax.ShapeDtypeStruct((math.prod(rows),), jnp.int32)))(
          jax.lax.stop_gradient(x).reshape(-1, x.shape[-1]))
  return maxima.reshape(rows), indices.reshape(rows)


def sum_of_squares(arrays: Sequence[jax.Array]) -> jax.Array:
  """The sum of the squares of all elements of the float32 `arrays` (one pass; float32 within
  blocks of 4096, the blocks in double): a scalar."""
  _require()
  arrays = [jax.lax.stop_gradient(a) for a in arrays]
  return jax.ffi.ffi_call("crystal_vae_sum_of_squares",
                          jax.ShapeDtypeStruct((1,), jnp.float32))(*arrays)[0]


def adam(params: Sequence[jax.Array], grads: Sequence[jax.Array], mus: Sequence[jax.Array],
         nus: Sequence[jax.Array], steps: jax.Array, bias_corrections: tuple[jax.Array, jax.Array],
         clip: tuple[jax.Array, jax.Array], *, b1: float, b2: float, eps: float
         ) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array], jax.Array]:
  """One Adam step on float32 arrays in a single pass over each (in place where the caller
  donates them), optax.adam's arithmetic: g = g / clip[0] * clip[1] (optax.clip_by_global_norm's
  scaling; (1, 1) keeps g), mu = (1 - b1) g + b1 mu, nu = (1 - b2) g² + b2 nu, and
  param += steps[i] (mu / c1) / (sqrt(nu / c2) + eps) with (c1, c2) = `bias_corrections` and
  steps[i] = -learning rate (times the array's multiplier). Returns the new parameters, mus, nus
  and the sum of the squared gradients as given."""
  _require()
  n = len(params)
  scalars = jnp.stack([*bias_corrections, *clip]).astype(jnp.float32)
  arrays = [*params, *grads, *mus, *nus]
  shapes = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in [*params, *mus, *nus]]
  aliases = {2 + k: 1 + k for k in range(n)}  # params; then mus and nus
  aliases.update({2 + 2 * n + k: 1 + n + k for k in range(2 * n)})
  outputs = jax.ffi.ffi_call(
      "crystal_vae_adam", [jax.ShapeDtypeStruct((1,), jnp.float32), *shapes],
      input_output_aliases=aliases)(
          scalars, jnp.asarray(steps, jnp.float32), *[jax.lax.stop_gradient(a) for a in arrays],
          b1=np.float64(b1), b2=np.float64(b2), eps=np.float32(eps))
  sum_of_squares_out, *rest = outputs
  return rest[:n], rest[n:2 * n], rest[2 * n:], sum_of_squares_out[0]
