"""Times forward+backward of every 3-D convolution shape in the paper (or `cpu`) model, per
implementation, optionally beside PyTorch's.

Candidates (all channels-last, same kernel layout as `nn.Conv`: (kd, kh, kw, in, out)):
  xla        lax.conv_general_dilated with three spatial dimensions.
  depth_sum  sum over kernel depth of 2-D convolutions on depth slices batched into the batch axis.
  depth_fold kernel-depth slices stacked into channels, then one 2-D convolution.
  im2col     all k^3 patches gathered into one matrix, then a matmul.
  fft        crystal_vae.native.convolution's FFT convolution (stride 1 only; nan for strided
             layers).
  native     crystal_vae.native.kernels' direct convolution (C++, compiled on first use).
  auto       crystal_vae.native.convolution.conv3d's own choice for the layer's shape.
  torch      PyTorch's conv3d, channels-last (an optional benchmark dependency:
             pip install torch==2.13.0+cpu), float32 only, its default threads (all cores).
Each is run in float32 and bfloat16. Usage:
  python launch/benchmarks/benchmark_conv.py [--model paper|cpu] [--batch 8] [--repeats 7]
      [--impls xla,depth_sum,...,torch] [--dtypes f32,bf16] [--layers enc1,dec2,...]
Prints one row per layer: median milliseconds of jitted value_and_grad(sum(out * ct)) w.r.t. input
and kernel, i.e. forward and both gradients (with grad alone XLA would drop the forward pass of
this linear loss).
Runs with the command line's process settings (YNNPACK for dots only, see
crystal_vae/process_settings.py); XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=... overrides
them, CRYSTAL_VAE_PROCESS_SETTINGS=0 leaves them out.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from crystal_vae import process_settings
from crystal_vae.native import convolution
from crystal_vae.native import kernels

# (name, input spatial size, in channels, out channels, kernel, stride, padding) of the paper model
# at grid 30 (see crystal_vae/models.py for the shape path); U-Net features (16, 32, 64, 128).
LAYERS = (
    ("enc1", 30, 1, 16, 5, 2, "SAME"),
    ("enc2", 15, 16, 32, 3, 1, "SAME"),
    ("enc3", 15, 32, 64, 3, 1, "SAME"),
    ("enc4", 15, 64, 128, 3, 2, "SAME"),
    ("dec1", 10, 128, 64, 5, 1, "SAME"),
    ("dec2", 20, 64, 32, 5, 1, "VALID"),
    ("dec3", 32, 32, 16, 4, 1, "SAME"),
    ("dec_out", 32, 16, 1, 3, 1, "VALID"),
    ("unet30a", 30, 1, 16, 3, 1, "SAME"),
    ("unet30b", 30, 16, 16, 3, 1, "SAME"),
    ("unet30up", 30, 48, 16, 3, 1, "SAME"),
    ("unet15", 15, 32, 32, 3, 1, "SAME"),
    ("unet8", 8, 64, 64, 3, 1, "SAME"),
    ("unet4", 4, 128, 128, 3, 1, "SAME"),
)
# The repeat `cpu` config's model (no U-Net; decoder 4 -> 8 -> 16 -> 32 -> VALID 30, 3^3 kernels).
CPU_LAYERS = (
    ("enc1", 30, 1, 16, 5, 2, "SAME"),
    ("enc2", 15, 16, 32, 3, 1, "SAME"),
    ("enc3", 15, 32, 64, 3, 2, "SAME"),
    ("enc4", 8, 64, 64, 3, 2, "SAME"),
    ("dec1", 8, 64, 32, 3, 1, "SAME"),
    ("dec2", 16, 32, 16, 3, 1, "SAME"),
    ("dec3", 32, 16, 8, 3, 1, "SAME"),
    ("dec_out", 32, 8, 1, 3, 1, "VALID"),
)
MODELS = {"paper": LAYERS, "cpu": CPU_LAYERS}


def explicit_pads(size, kernel, stride, padding):
  return lax.padtype_to_pads((size,) * 3, (kernel,) * 3, (stride,) * 3, padding)


def conv_xla(x, w, stride, pads):
  return lax.conv_general_dilated(
      x, w, (stride,) * 3, pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def depth_slices(x, w, stride, pads):
  """Depth-padded input and, per kernel depth, the strided depth slice feeding it."""
  x = jnp.pad(x, ((0, 0), pads[0], (0, 0), (0, 0), (0, 0)))
  out_depth = (x.shape[1] - w.shape[0]) // stride + 1
  end = stride * (out_depth - 1) + 1
  return [x[:, kd:kd + end:stride] for kd in range(w.shape[0])], out_depth


def conv_depth_sum(x, w, stride, pads):
  slices, out_depth = depth_slices(x, w, stride, pads)
  b, _, h, wd, c = x.shape
  total = 0.0
  for kd, s in enumerate(slices):
    y = lax.conv_general_dilated(
        s.reshape(b * out_depth, h, wd, c), w[kd], (stride,) * 2, pads[1:],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    total = total + y
  return total.reshape(b, out_depth, *total.shape[1:])


def conv_depth_fold(x, w, stride, pads):
  slices, out_depth = depth_slices(x, w, stride, pads)
  b, _, h, wd, c = x.shape
  stacked = jnp.concatenate(slices, axis=-1).reshape(b * out_depth, h, wd, -1)
  kernel = jnp.transpose(w, (1, 2, 0, 3, 4)).reshape(w.shape[1], w.shape[2], -1, w.shape[4])
  y = lax.conv_general_dilated(
      stacked, kernel, (stride,) * 2, pads[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape(b, out_depth, *y.shape[1:])


def conv_im2col(x, w, stride, pads):
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  k = w.shape[0]
  out = [(x.shape[i + 1] - k) // stride + 1 for i in range(3)]
  patches = []
  for kd in range(k):
    for kh in range(k):
      for kw in range(k):
        patches.append(x[:, kd:kd + stride * (out[0] - 1) + 1:stride,
                         kh:kh + stride * (out[1] - 1) + 1:stride,
                         kw:kw + stride * (out[2] - 1) + 1:stride])
  cols = jnp.concatenate(patches, axis=-1)
  return cols @ w.reshape(-1, w.shape[-1])


def conv_fft(x, w, stride, pads):
  return convolution._conv_fft(x, w, (stride,) * 3, pads)  # pylint: disable=protected-access


def conv_native(x, w, stride, pads):
  return kernels.conv(x, w, pads, stride)


IMPLS = {"xla": conv_xla, "depth_sum": conv_depth_sum, "depth_fold": conv_depth_fold,
         "im2col": conv_im2col, "fft": conv_fft, "native": conv_native}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def time_torch_layer(batch, layer, repeats):
  """PyTorch's channels-last conv3d, forward + both gradients, the same pads as XLA's."""
  import torch  # pylint: disable=import-outside-toplevel
  _, size, cin, cout, k, stride, padding = layer
  pads = explicit_pads(size, k, stride, padding)
  flat_pads = [p for axis in reversed(pads) for p in axis]  # (w_lo, w_hi, h_lo, h_hi, d_lo, d_hi)
  channels_last = torch.channels_last_3d
  x = torch.randn(batch, cin, size, size, size).contiguous(memory_format=channels_last)
  w = (torch.randn(cout, cin, k, k, k) / np.sqrt(k ** 3 * cin)).contiguous(
      memory_format=channels_last)
  x.requires_grad_(True)
  w.requires_grad_(True)
  out_shape = torch.nn.functional.conv3d(torch.nn.functional.pad(x, flat_pads), w,
                                         stride=stride).shape
  ct = torch.randn(out_shape).contiguous(memory_format=channels_last)
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    x.grad = w.grad = None
    y = torch.nn.functional.conv3d(torch.nn.functional.pad(x, flat_pads), w, stride=stride)
    (y * ct).sum().backward()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times[1:]))


def time_layer(impl, dtype_name, batch, layer, repeats):
  if impl == "torch":
    return time_torch_layer(batch, layer, repeats) if dtype_name == "f32" else float("nan")
  if impl == "fft" and layer[5] != 1:
    return float("nan")
  dtype = DTYPES[dtype_name]
  _, size, cin, cout, k, stride, padding = layer
  pads = explicit_pads(size, k, stride, padding)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, size, cin)), dtype)
  w = jnp.asarray(rng.normal(size=(k, k, k, cin, cout)) / np.sqrt(k ** 3 * cin), dtype)
  out_shape = jax.eval_shape(lambda a, b: conv_xla(a, b, stride, pads), x, w).shape
  ct = jnp.asarray(rng.normal(size=out_shape), dtype)
  if impl == "auto":  # what the model runs: convolution.conv3d's choice for this shape
    fn = lambda a, b, stride, pads: convolution.conv3d(a, b, (stride,) * 3, padding)
  else:
    fn = IMPLS[impl]
  step = jax.jit(jax.value_and_grad(
      lambda a, b: jnp.sum((fn(a, b, stride, pads) * ct).astype(jnp.float32)), argnums=(0, 1)))
  jax.block_until_ready(step(x, w))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(x, w))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", choices=sorted(MODELS), default="paper")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--dtypes", default="f32,bf16")
  parser.add_argument("--layers", default="", help="comma-separated layer names; empty = all")
  args = parser.parse_args()
  unknown = set(args.impls.split(",")) - set(IMPLS) - {"torch", "auto"}
  if unknown:
    parser.error(f"unknown --impls {sorted(unknown)}; choose from {sorted(IMPLS) + ['auto', 'torch']}")
  columns = [(i, d) for d in args.dtypes.split(",") for i in args.impls.split(",")]
  layers = [l for l in MODELS[args.model] if not args.layers or l[0] in args.layers.split(",")]
  print(f"backend={jax.default_backend()} devices={jax.devices()} batch={args.batch} "
        f"median of {args.repeats} (ms, fwd+bwd)")
  print(f"{'layer':9s} {'shape':28s} " + " ".join(f"{i + '/' + d:>15s}" for i, d in columns))
  totals = dict.fromkeys(columns, 0.0)
  for layer in layers:
    name, size, cin, cout, k, stride, padding = layer
    shape = f"{size}^3x{cin}->{cout} k{k}s{stride}{padding[0]}"
    row = []
    for column in columns:
      ms = time_layer(*column, args.batch, layer, args.repeats)
      totals[column] += ms
      row.append(f"{ms:15.1f}")
    print(f"{name:9s} {shape:28s} " + " ".join(row), flush=True)
  print(f"{'total':9s} {'':28s} " + " ".join(f"{totals[c]:15.1f}" for c in columns))


if __name__ == "__main__":
  process_settings.apply()
  main()
