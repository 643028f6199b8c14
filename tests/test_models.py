"""Tests for crystal_vae.models on small grids and widths (jitted or shape-only to stay fast)."""

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from conftest import require_native
from crystal_vae import models
from crystal_vae.configs import default
from crystal_vae.configs import recipes
from crystal_vae import process_settings
from crystal_vae.native import convolution
from crystal_vae.native import kernels

GRID = 14  # Odd on the way down: 14 -> 7 -> 4.
MAX_Z = 5


def key(seed: int) -> jax.Array:
  """RBG keys: jitted init compiles in ~6 s instead of ~30 s with threefry on this CPU."""
  return jax.random.key(seed, impl="rbg")


def small_config(**model_overrides) -> ml_collections.ConfigDict:
  model = default.get_config().model
  model.update(dict(
      latent_dim=6,
      encoder_features=(4, 4, 8, 8),
      decoder_start=2,
      decoder_features=(8, 4, 4),
      decoder_kernels=(3, 3, 3),
      decoder_paddings=("SAME", "SAME", "SAME"),  # 2 -> 4 -> 8 -> 16, final kernel 3 -> 14.
      unet_features=(4, 8, 8),
      lattice_hidden=(8,),
      conv_impl="xla",  # Compiles faster than depth_sum; both are checked against nn.Conv below.
  ))
  model.update(model_overrides)
  return ml_collections.ConfigDict(dict(
      model=model, voxel=dict(grid=GRID), dataset=dict(max_z=MAX_Z)))


def random_density(batch: int = 2, grid: int = GRID, seed: int = 0) -> jax.Array:
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.exponential(size=(batch, grid, grid, grid)), jnp.float32)


def init(model, density, **kwargs):
  return jax.jit(lambda d: model.init(key(0), d, key(1), train=False,
                                      **kwargs))(density)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
  model = models.model_from_config(small_config(lattice_head=True, dtype=dtype))
  density = jax.ShapeDtypeStruct((2, GRID, GRID, GRID), jnp.float32)
  variables = jax.eval_shape(
      lambda d: model.init(key(0), d, key(1), train=False), density)

  def run_all(variables, density):
    outputs, updates = model.apply(
        variables, density, key(2), train=True, mutable=["batch_stats"])
    mean, logvar = model.apply(variables, density, train=False, method="encode")
    recon = model.apply(variables, mean, train=False, method="decode")
    segmented = model.apply(variables, recon, train=False, method="segment")
    lattice = model.apply(variables, mean, method="predict_lattice")
    return outputs, updates, (mean, logvar, recon, segmented, lattice)

  outputs, updates, method_outputs = jax.eval_shape(run_all, variables, density)
  assert set(updates) == {"batch_stats"}
  field = (2, GRID, GRID, GRID)
  expected = dict(mean=(2, 6), logvar=(2, 6), z=(2, 6), recon=field,
                  segmented=(*field, MAX_Z + 1), lattice=(2, 3, 3))
  assert {k: v.shape for k, v in outputs.items()} == expected
  assert [v.shape for v in method_outputs] == [(2, 6), (2, 6), field, (*field, MAX_Z + 1), (2, 3, 3)]
  for value in [*outputs.values(), *method_outputs]:
    assert value.dtype == jnp.float32
  for leaf in jax.tree.leaves(variables["params"]):
    assert leaf.dtype == jnp.float32


def test_decoder_outputs_and_lattice_head_start():
  """With the same parameters the ReLU and softplus decoders differ only in the last
  activation: where ReLU is positive it is the pre-activation x, so softplus gives
  log(1 + e^x); where ReLU is 0 (x <= 0) softplus lies in (0, log 2]."""
  density = random_density()
  outputs = {}
  for name in models.DECODER_OUTPUTS:
    model = models.model_from_config(small_config(lattice_head=True, decoder_output=name))
    outputs[name], _ = jax.jit(lambda d, model=model: model.init_with_output(
        key(0), d, key(1), train=False))(density)
  relu, softplus = outputs["relu"]["recon"], outputs["softplus"]["recon"]
  positive = relu > 0
  assert jnp.any(positive) and jnp.any(~positive)  # both branches are exercised
  np.testing.assert_allclose(softplus[positive], jnp.log1p(jnp.exp(relu[positive])), rtol=1e-5)
  assert jnp.all((softplus[~positive] > 0) & (softplus[~positive] <= jnp.log(2.0) + 1e-6))
  # The lattice head starts at 5 Å times the identity (its Dense bias) plus a small term.
  lattice = outputs["relu"]["lattice"]
  np.testing.assert_allclose(lattice, np.broadcast_to(5.0 * np.eye(3), lattice.shape), atol=2.0)


def test_paper_decoder_shape_path():
  config = default.get_config().model
  sizes, final_kernel = models.decoder_sizes(
      30, config.decoder_start, config.decoder_kernels, config.decoder_paddings)
  assert sizes == [10, 16, 32] and final_kernel == 3


@pytest.mark.parametrize("grid,start,kernels,paddings", [
    (30, 5, (5, 5, 4), ("SAME", "VALID", "SAME")),
    (16, 2, (3, 3, 3), ("SAME", "SAME", "SAME")),
    (12, 2, (3, 3, 3), ("SAME", "SAME", "VALID")),
    (20, 3, (3, 3, 3), ("SAME", "SAME", "SAME")),
])
def test_decoder_output_is_grid(grid, start, kernels, paddings):
  decoder = models.Decoder(grid, start, 2, (2, 2, 2), kernels, paddings)
  z = jnp.ones((1, 3))
  variables = jax.eval_shape(decoder.init, key(0), z)
  assert jax.eval_shape(decoder.apply, variables, z).shape == (1, grid, grid, grid)


def test_decoder_unreachable_grid_raises():
  with pytest.raises(ValueError, match="cannot reach grid 30"):
    models.decoder_sizes(30, 3, (3, 3, 3), ("SAME", "SAME", "SAME"))  # Ends at 24 < 30.


@pytest.mark.parametrize("impl", ["xla", "depth_sum", "fft", "native"])
@pytest.mark.parametrize("kernel,stride,padding", [
    (5, 2, "SAME"), (3, 1, "SAME"), (4, 1, "SAME"), (2, 2, "SAME"), (5, 1, "VALID"),
    (3, 2, "VALID"),
])
def test_conv3d_matches_nn_conv(impl, kernel, stride, padding):
  if impl == "native":
    require_native()
  x = jax.random.normal(key(0), (2, 9, 8, 7, 3))
  if impl == "fft" and stride != 1:
    with pytest.raises(ValueError, match="stride 1 only"):
      models.Conv3D(5, kernel, stride, padding, impl).init(key(1), x)
    return
  reference = nn.Conv(5, (kernel,) * 3, (stride,) * 3, padding)
  conv = models.Conv3D(5, kernel, stride, padding, impl)
  params = reference.init(key(1), x)
  own_params = conv.init(key(1), x)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, params, own_params))
  params = jax.tree.map(lambda p: p + 0.1, params)  # Non-zero bias.
  expected = jax.jit(reference.apply)(params, x)
  np.testing.assert_allclose(jax.jit(conv.apply)(params, x), expected, rtol=1e-5, atol=1e-5)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  expected_grads = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(params, x)
  grads = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               grads, expected_grads)


def test_fft_convolution_in_bfloat16_and_on_a_big_cube():
  """The FFT path computes in float32 and returns the input's dtype; on a 16^3 cube with 1 output
  channel (the decoder's last layer) it matches lax's convolution, gradients included."""
  x = jax.random.normal(key(0), (2, 18, 16, 17, 4))
  kernel = jax.random.normal(key(1), (3, 3, 3, 4, 1)) * 0.2
  loss = lambda impl: lambda x, k: jnp.sum(jnp.sin(
      convolution.conv3d(x, k, (1, 1, 1), "VALID", impl)))
  for got, want in zip(jax.jit(jax.grad(loss("fft"), argnums=(0, 1)))(x, kernel),
                       jax.jit(jax.grad(loss("xla"), argnums=(0, 1)))(x, kernel)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  half = convolution.conv3d(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (1, 1, 1),
                            "SAME", "fft")
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32),
                             convolution.conv3d(x, kernel, (1, 1, 1), "SAME", "xla"), atol=0.1)


SAME3 = ((1, 1), (0, 2), (1, 1))  # SAME at stride 1 in depth and width, lopsided in height


@pytest.mark.parametrize("channels_in,features,shape,stride,taps,pads", [
    (16, 8, (2, 12, 11, 13), 1, 3, SAME3),  # the cpu decoder's 16 -> 8; row tails of 3, 4, 5
    (32, 24, (1, 9, 10, 17), 1, 3, SAME3),  # input channels in the kernel gradient's lanes
    (1, 16, (2, 8, 8, 8), 1, 3, SAME3),     # one input channel (the U-Net's first layer)
    (16, 48, (1, 7, 8, 13), 1, 3, SAME3),   # 32 output channels at once (rows of 5 + 4 + 4), + 16
    (8, 64, (2, 5, 6, 3), 1, 3, SAME3),     # 2 x 32 output channels, a row of 3
    (16, 32, (1, 6, 5, 29), 2, 3, SAME3),   # 32 at stride 2 (rows of 5 + 5 + 5)
    (5, 3, (2, 7, 9, 8), 1, 3, SAME3),      # output channels padded to a vector of 8
    (12, 1, (2, 9, 8, 11), 1, 3, SAME3),    # one output channel (the decoder's last), 8 + 4 in
    (1, 16, (2, 11, 10, 9), 2, 3, SAME3),   # the first encoder layer's stride 2
    (40, 8, (1, 7, 9, 8), 2, 3, SAME3),     # stride 2, input gradient over 32 + 8 input channels
    (8, 16, (2, 9, 7, 10), 3, 3, SAME3),    # stride 3
    # Implicit padding: all but one tap outside (depth), SAME (height), none (width) ...
    (16, 8, (2, 6, 9, 10), 1, 5, ((4, 4), (2, 2), (0, 0))),
    (8, 8, (1, 9, 8, 12), 1, 4, ((1, 2), (3, 0), (2, 1))),  # ... lopsided, a k4 SAME width
    (8, 8, (2, 9, 8, 11), 2, 4, ((3, 0), (0, 0), (3, 3))),  # ... at stride 2
])
def test_native_convolution_matches_lax_with_gradients(channels_in, features, shape, stride, taps,
                                                      pads):
  """The direct C++ convolution against lax's (float32 'highest'), the input and kernel gradients
  of a non-linear loss included, and bfloat16 in -> bfloat16 out."""
  require_native()
  x = jax.random.normal(key(0), shape + (channels_in,))
  kernel = jax.random.normal(key(1), (taps,) * 3 + (channels_in, features)) * 0.2
  reference = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride,) * 3, pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      precision="highest")
  own = lambda x, k: kernels.conv(x, k, pads, stride)
  want = reference(x, kernel)  # float32 sums of up to 2,000 terms: rounding ~ the largest entry
  np.testing.assert_allclose(jax.jit(own)(x, kernel), want, rtol=1e-5,
                             atol=1e-6 * float(np.abs(want).max()))
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
  for got, want in zip(jax.jit(jax.grad(loss(own), argnums=(0, 1)))(x, kernel),
                       jax.grad(loss(reference), argnums=(0, 1))(x, kernel)):
    # float32 sums over up to 32 x 1,530 terms: rounding relative to the largest entry
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * float(np.abs(want).max()))
  half = kernels.conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), pads, stride)
  assert half.dtype == jnp.bfloat16  # inputs and output rounded to 8 significant bits
  np.testing.assert_allclose(half.astype(jnp.float32), reference(x, kernel), rtol=1e-2, atol=0.1)


@pytest.mark.slow
def test_native_convolution_builds_once_and_falls_back_without_a_compiler(tmp_path):
  """A fresh cache is filled with one library, which a second build reuses; with no compiler
  `available()` is False, logs why, and `auto` still convolves (with XLA's formulations)."""
  require_native()
  env = dict(os.environ, CRYSTAL_VAE_CACHE=str(tmp_path / "cache"))
  script = ("from crystal_vae.native import kernels as n; a = n.build(); b = n.build(); "
            "print(a == b, a.stat().st_mtime_ns == b.stat().st_mtime_ns)")
  run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600, check=True)
  assert run.stdout.split() == ["True", "True"]
  assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".so"]
  env["CXX"] = str(tmp_path / "no-such-compiler")
  env["CRYSTAL_VAE_CACHE"] = str(tmp_path / "empty")
  script = ("import jax, jax.numpy as jnp; from crystal_vae import models; "
            "from crystal_vae.configs import default; "
            "from crystal_vae.native import convolution, kernels as n; "
            "x = jnp.ones((1, 16, 16, 16, 8)); k = jnp.ones((3, 3, 3, 8, 8)); "
            "y = convolution.conv3d(x, k, (1, 1, 1), 'SAME', 'auto'); "
            "print(n.available(), float(y[0, 8, 8, 8, 0]))\n"
            "try: convolution.conv3d(x, k, (1, 1, 1), 'SAME', 'native')\n"
            "except RuntimeError as e: print('refused:', e)\n"
            "model = default.get_config().model; model.conv_impl = 'native'\n"
            "try: models._check_choices(model)\n"
            "except models.ModelConfigError as e: print('config refused:', e)")
  run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600, check=True)
  assert run.stdout.split()[:2] == ["False", "216.0"]  # 27 taps x 8 channels of ones
  assert "refused: the native CPU kernels could not be built" in run.stdout
  # main turns a ModelConfigError into one line (tests/test_main.py)
  assert "config refused: model.conv_impl 'native' could not be built" in run.stdout
  assert "native CPU kernels unavailable" in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 3), (1, 8, 8, 8, 16), (2, 15, 6, 1, 12)])
def test_native_upsampling_is_jax_trilinear_resize_with_its_gradient(shape):
  """kernels.upsample2 (which the decoder and U-Net use on CPU to double sides) against
  jax.image.resize's trilinear (half-pixel centres, clamped edges), values and input gradient of
  a non-linear loss; any channel count (vectors of 8 plus a rest), a side of 1 included."""
  require_native()
  x = jax.random.normal(key(0), shape)
  doubled = (shape[0], *(2 * side for side in shape[1:4]), shape[4])
  weights = jax.random.normal(key(1), doubled)
  resize = lambda x: jax.image.resize(x, doubled, "trilinear")
  np.testing.assert_allclose(jax.jit(kernels.upsample2)(x), resize(x), rtol=1e-5, atol=1e-6)
  loss = lambda up: lambda x: jnp.sum(jnp.sin(up(x)) * weights)
  np.testing.assert_allclose(jax.jit(jax.grad(loss(kernels.upsample2)))(x),
                             jax.grad(loss(resize))(x), rtol=1e-4, atol=1e-5)
  assert kernels.upsample2(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("cube, features, strides, padding, padded, expected", [
    (16, 2, (1, 1, 1), "SAME", 18, "fft"),        # 2 outputs: the FFT's
    (16, 16, (1, 1, 1), "SAME", 18, "native"),
    (16, 1, (1, 1, 1), "SAME", 18, "native"),       # one output channel
    (8, 16, (1, 1, 1), "SAME", 10, "native"),       # the padding lifts an 8^3 cube to 10^3
    (8, 16, (1, 1, 1), "VALID", 8, "depth_sum"),    # the same cube unpadded
    (11, 16, (2, 2, 2), "SAME", 13, "native"),      # (6 - 1) * 2 + 3 - 11 = 2 voxels of padding
    (11, 16, (2, 2, 2), "VALID", 11, "depth_sum"),
    (16, 16, (2, 1, 1), "SAME", 18, "depth_sum"),   # strides differing by axis: neither runs it
    (16, 2, (2, 2, 2), "SAME", 17, "depth_sum"),    # strided: no FFT
])
def test_auto_convolution_on_cpu_is_the_rules_choice_for_the_padded_input(
    cube, features, strides, padding, padded, expected):
  """`auto` gives bit for bit the values of the implementation that `prefers_native` and
  `prefers_fft` choose for the padded input (its sides worked out by hand), and not those of the
  other implementations that can run the layer; the choice runs (native: one stride for all axes,
  FFT: stride 1)."""
  assert jax.default_backend() == "cpu"
  require_native()
  x = jax.random.normal(key(0), (1, cube, cube, cube, 12))
  kernel = jax.random.normal(key(1), (3, 3, 3, 12, features))
  chosen = ("native" if convolution.prefers_native((padded,) * 3, kernel.shape, strides) else
            "fft" if convolution.prefers_fft((padded,) * 3, kernel.shape, strides) else "depth_sum")
  assert chosen == expected
  convolve = lambda impl: jax.jit(
      lambda x, k: convolution.conv3d(x, k, strides, padding, impl))(x, kernel)
  auto = convolve("auto")
  np.testing.assert_array_equal(auto, convolve(chosen))
  others = {"native", "fft", "depth_sum"} - {chosen}
  if len(set(strides)) > 1:
    others -= {"native"}
  if strides != (1, 1, 1):
    others -= {"fft"}
  for other in others:
    assert not np.array_equal(auto, convolve(other)), other


def test_scale_gradient_hand_computed():
  x = jnp.array([1.0, -2.0, 3.0])
  weights = jnp.array([0.5, 1.0, 2.0])
  np.testing.assert_array_equal(models.scale_gradient(x, 0.3), x)
  # d/dx sum(w * x^2) = 2 w x, scaled by 0.3.
  loss = lambda x, scale: jnp.sum(weights * models.scale_gradient(x, scale) ** 2)
  np.testing.assert_allclose(jax.grad(loss)(x, 0.3), [0.3, -1.2, 3.6], rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x, jnp.float32(0.3)), [0.3, -1.2, 3.6],
                             rtol=1e-6)


@pytest.mark.slow
def test_gradient_routing():
  model = models.model_from_config(small_config())
  density = random_density()
  species = jax.random.randint(key(3), density.shape, 0, MAX_Z + 1)
  variables = init(model, density)
  beta, gamma = 0.7, 0.25

  def weighted_loss(params, weights, scale):
    outputs, _ = model.apply(
        {**variables, "params": params}, density, key(2), train=True,
        unet_grad_scale=scale, mutable=["batch_stats"])
    mse = jnp.mean((outputs["recon"] - density) ** 2)
    kl = -0.5 * jnp.mean(1 + outputs["logvar"] - outputs["mean"] ** 2 - jnp.exp(outputs["logvar"]))
    ce = jnp.mean(nn.log_softmax(outputs["segmented"]) * -jax.nn.one_hot(species, MAX_Z + 1))
    return weights @ jnp.stack([mse, kl, ce])

  # The total loss MSE + beta KL + CE split into its parts; one compilation for all calls.
  grad = jax.jit(jax.grad(weighted_loss))
  params = variables["params"]
  vae_grads = grad(params, jnp.array([1.0, beta, 0.0]), jnp.float32(gamma))
  ce_grads_scaled = grad(params, jnp.array([0.0, 0.0, 1.0]), jnp.float32(gamma))
  ce_grads = grad(params, jnp.array([0.0, 0.0, 1.0]), jnp.float32(1.0))

  for leaf in jax.tree.leaves(vae_grads["unet"]):
    assert not jnp.any(leaf)  # MSE and KL give the U-Net nothing.
  for scaled, unscaled in zip(jax.tree.leaves(ce_grads_scaled["decoder"]),
                              jax.tree.leaves(ce_grads["decoder"])):
    assert jnp.any(scaled)
    np.testing.assert_allclose(scaled, gamma * unscaled, rtol=1e-4, atol=1e-9)
  # The U-Net gets the unscaled CE gradient, whatever gamma.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               ce_grads_scaled["unet"], ce_grads["unet"])


def test_conditional_scales_bottleneck():
  model = models.model_from_config(small_config(conditional=True))
  density = random_density()
  ones = jnp.ones(2)
  variables = init(model, density, condition=ones)
  condition = jnp.array([2.0, 0.5])
  encode = jax.jit(lambda v, d, c: model.apply(v, d, train=False, condition=c, method="encode"))
  decode = jax.jit(lambda v, z, c: model.apply(v, z, train=False, condition=c, method="decode"))
  mean_1, logvar_1 = encode(variables, density, ones)
  mean_c, logvar_c = encode(variables, density, condition)
  heads = variables["params"]["encoder"]
  # The heads are affine in the scaled features: out(c) - bias = c * (out(1) - bias).
  for head, out_1, out_c in (("mean", mean_1, mean_c), ("logvar", logvar_1, logvar_c)):
    bias = heads[head]["bias"]
    np.testing.assert_allclose(out_c - bias, condition[:, None] * (out_1 - bias), rtol=1e-4,
                               atol=1e-5)
  assert not np.allclose(mean_c, mean_1)

  # Without biases the decoder is positively homogeneous (LeakyReLU, ReLU, trilinear resize are),
  # so multiplying the Dense output by c multiplies the density by c.
  flat = traverse_util.flatten_dict(variables["params"])
  no_bias = traverse_util.unflatten_dict(
      {k: jnp.zeros_like(v) if k[0] == "decoder" and k[-1] == "bias" else v
       for k, v in flat.items()})
  unbiased = {**variables, "params": no_bias}
  z = jax.random.normal(key(4), (2, 6))
  recon_1 = decode(unbiased, z, ones)
  recon_c = decode(unbiased, z, condition)
  assert jnp.any(recon_1 > 0)
  np.testing.assert_allclose(recon_c, condition[:, None, None, None] * recon_1, rtol=1e-4,
                             atol=1e-6)
  with pytest.raises(ValueError, match="needs a per-sample"):
    model.apply(variables, z, train=False, method="decode")


def test_attention_gate_in_unit_interval():
  skip = 10 * jax.random.normal(key(0), (2, 7, 7, 7, 3))  # Large: sigmoid saturates.
  gate = 10 * jax.random.normal(key(1), (2, 4, 4, 4, 5))
  attention = models.AttentionGate(4)
  variables = jax.jit(attention.init)(key(2), skip, gate)
  gated, alpha = jax.jit(attention.apply)(variables, skip, gate)
  assert alpha.shape == (2, 7, 7, 7, 1)
  assert jnp.all((alpha >= 0) & (alpha <= 1))
  assert jnp.any(alpha < 0.5) and jnp.any(alpha > 0.5)
  np.testing.assert_allclose(gated, skip * alpha, rtol=1e-6)


@pytest.mark.parametrize("representation", ["repeat", "unit_cell"])
@pytest.mark.parametrize("variant", ["paper", "cpu", "gpu", "quick"])
def test_every_config_variant_builds_a_model_that_reaches_its_grid(representation, variant):
  """Shape-only: each shipped config's encoder, decoder and heads fit together, the decoded
  density and species logits cover the config's grid, and the parameters of the variants meant
  to be shipped (`cpu`, `gpu`) stay under the 25 MB a pretrained workdir may take (float32)."""
  config = recipes.get_config(representation, variant)
  grid = config.voxel.grid
  density = jax.ShapeDtypeStruct((2, grid, grid, grid), jnp.float32)
  variables = jax.eval_shape(lambda: models.init_variables(config, jax.random.key(0)))
  model = models.model_from_config(config)
  composition = (jnp.zeros((2, config.dataset.max_z + 1)) if config.model.composition_head
                 else None)
  outputs = jax.eval_shape(lambda v, d: model.apply(v, d, jax.random.key(1), train=False,
                                                    composition=composition), variables, density)
  assert outputs["recon"].shape == (2, grid, grid, grid)
  if config.model.segmenter:
    assert outputs["segmented"].shape[:4] == (2, grid, grid, grid)
  else:  # the repeat `cpu` model reads atoms off the density
    assert "segmented" not in outputs and "unet" not in variables["params"]
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  if variant in ("cpu", "gpu"):
    assert params * 4 < 25 * 2**20, params


_PROCESS = """
import ctypes, json, os, resource, sys
import crystal_vae.main  # every module the command line imports
if sys.argv[1] == "apply":
  from crystal_vae import process_settings
  process_settings.apply()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size = 64 << 20
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size); ctypes.memset(block, 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
import jax, jax.numpy as jnp
from crystal_vae.native import convolution
x, w = jnp.ones((2, 8, 16, 16, 32)), jnp.ones((3, 3, 3, 32, 32))  # YNNPACK takes these
conv = jax.jit(lambda w: convolution.conv3d(x, w, (1, 1, 1), "SAME", "depth_sum"))
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS"), "page_faults": faults,
                  "ynn_convolution": "__ynn_fusion" in conv.lower(w).compile().as_text()}))
"""
_DOTS_ONLY = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


@pytest.mark.parametrize("apply, environment, flag_added, memory_kept", [
    (False, {}, False, False),  # importing crystal_vae (all the command line imports) alone
    (True, {}, True, True),
    (True, {"CRYSTAL_VAE_KEEP_FREED_MEMORY": "0"}, True, False),
    (True, {"CRYSTAL_VAE_PROCESS_SETTINGS": "0"}, False, False),
])
@pytest.mark.slow
def test_process_settings_take_effect_when_applied_and_not_on_import(apply, environment,
                                                                     flag_added, memory_kept):
  """`process_settings.apply()` keeps YNNPACK to dots (its CPU convolutions are the slow path
  here) and has glibc reuse a freed 64 MiB block without page faults (it would unmap it and
  fault 16 Ki pages in again); importing crystal_vae does neither, and the environment switches
  turn them off."""
  try:
    glibc = os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError):
    glibc = False
  if not glibc:
    pytest.skip("glibc's malloc only")
  flag_added = flag_added and importlib.metadata.version("jaxlib").startswith("0.10.")
  env = {name: value for name, value in os.environ.items()
         if name not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
         and not name.startswith("CRYSTAL_VAE_")}
  env.update(environment, JAX_PLATFORMS="cpu")
  result = json.loads(subprocess.run(
      [sys.executable, "-c", _PROCESS, "apply" if apply else "import"], env=env,
      capture_output=True, text=True, timeout=300, check=True).stdout)
  assert result["xla_flags"] == (_DOTS_ONLY if flag_added else None)
  if flag_added:  # without the flag, whether YNNPACK takes the convolution depends on the CPU
    assert not result["ynn_convolution"]
  if memory_kept:
    assert result["page_faults"] < 100
  elif "[always]" not in pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
    assert result["page_faults"] > (64 << 20) // 4096 // 2  # at least half the block's pages


@pytest.mark.parametrize("before, after", [
    ("", _DOTS_ONLY),
    ("--xla_force_host_platform_device_count=2",
     "--xla_force_host_platform_device_count=2 " + _DOTS_ONLY),
    # A value the user set for the flag is kept as it is.
    (_DOTS_ONLY + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
     _DOTS_ONLY + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"),
])
def test_the_ynnpack_flag_joins_the_users_xla_flags(before, after, monkeypatch):
  if not importlib.metadata.version("jaxlib").startswith("0.10."):
    pytest.skip("the flag is only set for jaxlib 0.10")
  monkeypatch.setenv("XLA_FLAGS", before)
  assert process_settings.ynnpack_for_dots_only() == (before != after)
  assert os.environ["XLA_FLAGS"] == after


@pytest.mark.slow
@pytest.mark.parametrize("use_native", [True, False])
def test_batch_norm_is_flax_batch_norm_with_its_gradients(use_native, monkeypatch):
  """models.BatchNorm against nn.BatchNorm: the same variables, training outputs, running
  statistics, evaluation outputs and gradients (input, scale, bias) of a non-linear loss, with
  the native sums and without them (the jnp reductions other backends take)."""
  if use_native:
    require_native()
  else:
    monkeypatch.setattr(kernels, "available", lambda: False)
  x = jax.random.normal(key(0), (3, 5, 6, 4, 24)) * 2.0 + jnp.arange(24) * 0.5
  ours, flax_bn = (models.BatchNorm(use_running_average=False),
                   nn.BatchNorm(use_running_average=False))
  variables = flax_bn.init(key(1), x)
  assert (jax.tree.map(jnp.shape, ours.init(key(1), x)) == jax.tree.map(jnp.shape, variables))
  variables = {"params": {"scale": 1.0 + jax.random.normal(key(2), (24,)) * 0.3,
                          "bias": jax.random.normal(key(3), (24,))},
               "batch_stats": {"mean": jnp.linspace(-1, 1, 24), "var": jnp.linspace(0.5, 2, 24)}}
  run = lambda module: lambda params, x: module.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
  (y, stats), (y_flax, stats_flax) = run(ours)(variables["params"], x), run(flax_bn)(
      variables["params"], x)
  x64 = np.asarray(x, np.float64)  # float64 reference: float32 sums (flax's, jnp's) are off by
  # up to ~5e-5 here (a variance of 4 from a mean square of ~94)
  exact = ((x64 - x64.mean((0, 1, 2, 3))) / np.sqrt(x64.var((0, 1, 2, 3)) + 1e-5)
           * np.asarray(variables["params"]["scale"]) + np.asarray(variables["params"]["bias"]))
  np.testing.assert_allclose(y, exact, rtol=5e-5, atol=5e-5)
  np.testing.assert_allclose(y, y_flax, rtol=1e-4, atol=1e-4)
  for name in ("mean", "var"):
    np.testing.assert_allclose(stats["batch_stats"][name], stats_flax["batch_stats"][name],
                               rtol=1e-5, atol=1e-6)
  loss = lambda module: lambda params, x: jnp.sum(jnp.sin(run(module)(params, x)[0]) * x)
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables["params"], x)
  grads_flax = jax.grad(loss(flax_bn), argnums=(0, 1))(variables["params"], x)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_flax)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
  evaluate = lambda module: module.clone(use_running_average=True).apply(variables, x)
  np.testing.assert_allclose(evaluate(ours), evaluate(flax_bn), rtol=1e-5, atol=1e-5)
  half = models.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  assert half.apply(variables, x.astype(jnp.bfloat16), mutable=["batch_stats"])[0].dtype == \
      jnp.bfloat16


@pytest.mark.parametrize("shape", [(2, 6, 7, 5, 16), (1, 15, 15, 15, 3)])
def test_native_max_pooling_is_flax_max_pool_with_its_gradient(shape):
  """kernels.max_pool2 (the U-Net's pooling on CPU) against nn.max_pool 2x2x2 stride 2 SAME, odd
  sides included, and their gradients; after a ReLU (ties at 0) the gradient through the ReLU
  agrees too."""
  require_native()
  x = jax.random.normal(key(0), shape)
  reference = lambda x: nn.max_pool(x, (2, 2, 2), (2, 2, 2), "SAME")
  np.testing.assert_array_equal(jax.jit(kernels.max_pool2)(x), reference(x))
  loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(jax.nn.relu(x))) * jnp.arange(shape[-1]))
  np.testing.assert_allclose(jax.jit(jax.grad(loss(kernels.max_pool2)))(x),
                             jax.grad(loss(reference))(x), rtol=1e-6, atol=1e-6)
  loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(x)))
  np.testing.assert_allclose(jax.jit(jax.grad(loss(kernels.max_pool2)))(x),
                             jax.grad(loss(reference))(x), rtol=1e-6, atol=1e-6)
  assert kernels.max_pool2(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_native_convolution_refuses_padding_outside_the_kernel():
  """Pads must lie in [0, kernel side): the input gradient's padding (side - 1 - pad) is then
  never negative; a wrong value is a clear error, not a wrong result."""
  x, kernel = jnp.ones((1, 6, 6, 6, 8)), jnp.ones((3, 3, 3, 8, 8))
  for pads in (((3, 0), (1, 1), (1, 1)), ((1, 1), (-1, 1), (1, 1))):
    with pytest.raises(ValueError, match="outside"):
      kernels.conv(x, kernel, pads)


@pytest.mark.parametrize("use_native", [True, False])
def test_class_max_is_jnp_max_and_argmax(use_native, monkeypatch):
  """models.class_max against jnp.max and jnp.argmax over 101 and 3 classes: ties (the first
  class wins), rows with NaN (NaN at its first place), -inf and all-equal rows."""
  if use_native:
    require_native()
  else:
    monkeypatch.setattr(kernels, "available", lambda: False)
  for classes in (101, 3):
    logits = np.array(jax.random.normal(key(classes), (2, 3, 4, classes)))
    logits[0, 0, 0, [1, classes - 1]] = 9.0  # a tie: class 1
    logits[0, 0, 1, :] = 0.5  # all equal: class 0
    logits[0, 1, 2, [0, 2]] = np.nan  # NaN: class 0
    logits[1, 2, 3, 2] = np.nan  # NaN after the maximum
    logits[1, 0, 0, :] = -np.inf
    logits[1, 0, 1, classes // 2] = np.inf
    maxima, indices = jax.jit(models.class_max)(jnp.asarray(logits))
    np.testing.assert_array_equal(indices, np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(maxima, np.max(logits, axis=-1))
    assert indices.dtype == jnp.int32 and indices[0, 0, 0] == 1
