"""Train-step throughput, FLOPs per sample (XLA cost analysis), achieved FLOP/s and peak memory of
the JAX step, side by side with a PyTorch CPU twin of the same model and step.

    python launch/benchmarks/benchmark_train.py                               # JAX vs PyTorch
    python launch/benchmarks/benchmark_train.py --models=quick --steps=1      # smoke test
    python launch/benchmarks/benchmark_train.py --models=cpu --impls=auto,depth_sum,xla \
        --jax_variants=base,no_donate,onednn --torch_impls=ncdhw,channels_last
    python launch/benchmarks/benchmark_train.py --models=quick --check_twin   # twin == JAX, then time

The step measured is `train.train_step` (forward, backward and Adam update of the β-VAE and the
U-Net) on already-voxelised grids; voxelisation has its own benchmark. The PyTorch twin
(launch/benchmarks/torch_twin.py) is the same architecture layer for layer (equal parameter
counts are checked and printed; --check_twin also copies the Flax parameters in and compares the
loss and every gradient) doing the same forward, loss terms, metrics and Adam update.

Every row runs in a fresh subprocess (one per model x framework x implementation), so its peak
RSS (`ru_maxrss`, whole process: imports, XLA compilation, the steps) is its own; the
"steps peak" column is the RSS high-water mark of the timed steps alone (VmHWM reset after the
warm-up step). Every row of a model is credited with the same FLOPs: XLA's cost analysis of the
JAX step with `depth_sum` convolutions. PyTorch is optional: without it the twin is skipped.
Both frameworks run with the command line's process settings (crystal_vae/process_settings.py:
among them freed memory kept for reuse, ~15% of either's `cpu` step; CRYSTAL_VAE_PROCESS_SETTINGS=0
leaves them out). A row's s/step is the median
of its timed steps (each step's time is in the notes at the end), so one step slowed by another
tenant of a shared machine does not move it.

JAX variants (--jax_variants, joined with '+', e.g. no_native+onednn): see `JAX_VARIANTS`.
--xla_flags adds XLA flags to every JAX row.
"""

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

from crystal_vae import process_settings

_MODELS = flags.DEFINE_list("models", ["paper", "cpu"],
                            "Config variants: paper, cpu, gpu, quick.")
_FRAMEWORKS = flags.DEFINE_list("frameworks", ["jax", "torch"], "jax and/or torch.")
_IMPLS = flags.DEFINE_list("impls", ["auto"], "JAX: model.conv_impl values to compare (auto: "
                          "what the model runs, native, fft or depth_sum per layer on CPU).")
_JAX_VARIANTS = flags.DEFINE_list(
    "jax_variants", ["base"], "JAX: step variants (JAX_VARIANTS keys joined with '+').")
_TORCH_IMPLS = flags.DEFINE_list(
    "torch_impls", ["ncdhw", "channels_last"], "PyTorch: ncdhw (contiguous) and/or "
    "channels_last (channels_last_3d memory format); the ratio line takes the faster.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Samples per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after one warm-up step.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "Repeat all rows this many times (interleaved), for a loaded machine.")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "Extra XLA_FLAGS for every JAX row.")
_CHECK_TWIN = flags.DEFINE_bool(
    "check_twin", False, "First load the Flax parameters into the twin and compare the loss and "
    "gradients (batch 2) per model.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: a JSON job run in this process.")

TORCH_PIN = "torch==2.13.0+cpu"

# Step variants tried to close the gap on CPU: matmul precision, XLA CPU flags, ... The base step
# is jitted as train.Trainer jits it: donate_argnums=0 (the state's buffers are updated in place).
JAX_VARIANTS = {
    "base": {},
    "no_donate": {"donate": False},  # new buffers for the state every step (100 ms on paper)
    "highest": {"precision": "highest"},  # jax_default_matmul_precision
    "bf16_matmul": {"precision": "bfloat16"},
    "bf16": {"dtype": "bfloat16"},  # model.dtype: activations and convolutions in bfloat16
    "no_mt_eigen": {"xla_flags": "--xla_cpu_multi_thread_eigen=false"},
    "fast_math": {"xla_flags": "--xla_cpu_enable_fast_math=true"},
    "onednn": {"xla_flags": "--xla_cpu_use_onednn=true"},
    "onednn_cc": {"xla_flags": "--xla_cpu_use_onednn=true "
                                "--xla_cpu_experimental_onednn_custom_call=true"},
    "no_xnnpack": {"xla_flags": "--xla_cpu_use_xnnpack=false"},  # true is the default
    "no_thunks": {"xla_flags": "--xla_cpu_use_thunk_runtime=false"},
    # jaxlib 0.10's default, which the process settings turn off: YNNPACK convolutions too.
    "ynn_conv": {"xla_flags": "--xla_cpu_experimental_ynn_fusion_type="
                              "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                              "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
    # Model-code change, monkeypatched (see _conv_depth_sum_dot_kernel_grad); conv_impl depth_sum.
    "dot_kernel_grad": {"patch": "dot_kernel_grad"},
    # conv_impl auto as if the native convolution could not be built (fft or depth_sum per layer).
    "no_native": {"patch": "no_native"},
}


def _conv_depth_sum_dot_kernel_grad(x, kernel, strides, pads):
  """`convolution._conv_depth_sum` (same forward and input gradient) whose kernel gradient is one
  dot per kernel tap, dW[a, b, c] = patch(a, b, c)ᵀ · dY contracted over all output voxels,
  instead of what autodiff gives: 2-D convolutions whose window is the whole output plane
  (32x32 for the paper decoder) and whose output is the 3x3..5x5 kernel, which XLA:CPU runs at
  ~1-2 GFLOP/s and which took over half of the paper model's step (profile).
  Measured: each hot layer's gradient 1.3-2.3x faster in isolation, but the whole
  step no faster (paper 18.1 vs 18.4 s, cpu 4.45 vs 4.51 s, quick slower) and peak RSS 2.7x
  (the per-tap slices are materialised): kept as a variant to measure, not a fix."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from crystal_vae.native import convolution  # pylint: disable=g-import-not-at-top
  conv = convolution._ORIGINAL_CONV_DEPTH_SUM  # pylint: disable=protected-access

  @jax.custom_vjp
  def f(x, kernel):
    return conv(x, kernel, strides, pads)

  def f_fwd(x, kernel):
    return f(x, kernel), (x, kernel)

  def f_bwd(residuals, cotangent):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda v: conv(v, kernel, strides, pads), x)
    (dx,) = input_vjp(cotangent)
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = cotangent.shape[1:4]
    cot = cotangent.reshape(-1, cotangent.shape[-1])
    taps = []
    for a in range(kernel.shape[0]):
      for b in range(kernel.shape[1]):
        for c in range(kernel.shape[2]):
          patch = padded[:, a:a + strides[0] * (out[0] - 1) + 1:strides[0],
                         b:b + strides[1] * (out[1] - 1) + 1:strides[1],
                         c:c + strides[2] * (out[2] - 1) + 1:strides[2]]
          taps.append(lax_dot(patch.reshape(-1, x.shape[-1]), cot))
    dkernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    return dx, dkernel

  def lax_dot(p, g):  # (N, I)ᵀ (N, O) -> (I, O)
    return jax.lax.dot_general(p, g, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)

  f.defvjp(f_fwd, f_bwd)
  return f(x, kernel)


def _patch_model(patch: str) -> None:
  """Monkeypatches crystal_vae.native in this (worker) process: a model-code change measured
  without editing the model."""
  from crystal_vae.native import convolution, kernels  # pylint: disable=g-import-not-at-top
  if patch == "dot_kernel_grad":
    # pylint: disable=protected-access
    convolution._ORIGINAL_CONV_DEPTH_SUM = convolution._conv_depth_sum
    convolution._conv_depth_sum = _conv_depth_sum_dot_kernel_grad
  elif patch == "no_native":
    kernels.available = lambda: False
  else:
    raise ValueError(f"unknown model patch {patch!r}")


def _variant_options(variant: str) -> dict:
  options = {"donate": True, "precision": None, "xla_flags": "", "patch": "", "dtype": ""}
  for name in variant.split("+"):
    if name not in JAX_VARIANTS:
      raise ValueError(f"JAX variant {name!r} not in {sorted(JAX_VARIANTS)}")
    for key, value in JAX_VARIANTS[name].items():
      options[key] = f"{options[key]} {value}".strip() if key == "xla_flags" else value
  return options


def _config(variant: str):
  from crystal_vae.configs import recipes  # pylint: disable=g-import-not-at-top
  config = recipes.get_config("repeat", None if variant == "paper" else variant)
  # Small MLPs on z (and the composition into the encoder's mean) the twin does not model.
  config.model.lattice_head = False
  config.model.composition_head = False
  config.lr_mults = ()
  return config


def spec_of(config) -> dict:
  """What the PyTorch twin reads of a config, as plain JSON (the twin imports no JAX)."""
  model, loss = config.model, config.loss
  unsupported = {"lattice_head": model.lattice_head, "composition_head": model.composition_head,
                 "properties": bool(model.properties), "conditional": model.conditional,
                 "lr_mults": bool(config.lr_mults), "dtype": model.dtype != "float32"}
  if any(unsupported.values()):
    raise ValueError(f"the PyTorch twin does not model {[k for k, v in unsupported.items() if v]}")
  return {
      "grid": config.voxel.grid, "box": config.voxel.box, "sigma": config.voxel.sigma,
      "max_z": config.dataset.max_z, "latent_dim": model.latent_dim,
      "encoder_features": list(model.encoder_features),
      "encoder_kernels": list(model.encoder_kernels),
      "encoder_strides": list(model.encoder_strides),
      "decoder_start": model.decoder_start, "decoder_features": list(model.decoder_features),
      "decoder_kernels": list(model.decoder_kernels),
      "decoder_paddings": list(model.decoder_paddings),
      "decoder_output": model.decoder_output, "segmenter": model.segmenter,
      "unet_features": list(model.unet_features),
      "species_head": model.species_head,
      "loss": {k: loss[k] for k in ("beta", "gamma", "balanced", "z_weight", "teacher_forcing",
                                    "site_z_weight")},
      "learning_rate": config.learning_rate, "lr_schedule": config.lr_schedule,
      "warmup_steps": config.warmup_steps, "num_train_steps": config.num_train_steps,
      "final_learning_rate_fraction": config.final_learning_rate_fraction,
      "grad_clip_norm": config.grad_clip_norm,
  }


def _data(grid: int, max_z: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  density = rng.gamma(0.5, 0.2, (batch_size, grid, grid, grid)).astype(np.float32)
  species = rng.integers(0, max_z + 1, (batch_size, grid, grid, grid)).astype(np.int32)
  return density, species


def _reset_peak_rss() -> bool:
  """Resets the process's RSS high-water mark (Linux clear_refs 5); False where not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _hwm_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _max_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------- workers

def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def jax_worker(job: dict) -> dict:
  """Times train.train_step (one warm-up step, then `steps`); steps 0 = compile for FLOPs only."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from crystal_vae import train  # pylint: disable=g-import-not-at-top

  options = _variant_options(job["variant"])
  if options["patch"]:
    _patch_model(options["patch"])
  if options["precision"]:
    jax.config.update("jax_default_matmul_precision", options["precision"])
  config = _config(job["model"])
  config.model.conv_impl = job["impl"]
  if options["dtype"]:
    config.model.dtype = options["dtype"]
  batch_size, steps = job["batch_size"], job["steps"]
  density, species = _data(config.voxel.grid, config.dataset.max_z, batch_size)
  batch = {"density": jnp.asarray(density), "species": jnp.asarray(species),
           "lattice": jnp.tile(jnp.eye(3) * 4.0, (batch_size, 1, 1)),
           # a composition head reads the atoms: five per crystal, Z 8 and 38
           "atomic_numbers": jnp.tile(jnp.array([[8, 8, 8, 38, 38]], jnp.int32), (batch_size, 1)),
           "atom_mask": jnp.ones((batch_size, 5), bool)}
  start = time.perf_counter()
  state = train.create_train_state(config, jax.random.key(0))
  jax.block_until_ready(state)
  init_seconds = time.perf_counter() - start
  params = sum(x.size for x in jax.tree.leaves(state.params))
  step = jax.jit(lambda s, b, r: train.train_step(s, b, r, config=config),
                 donate_argnums=0 if options["donate"] else ())
  start = time.perf_counter()
  compiled = step.lower(state, batch, jax.random.key(1)).compile()
  compile_seconds = time.perf_counter() - start
  result = {"flops": _flops(compiled), "params": params, "compile_seconds": compile_seconds,
            "init_seconds": init_seconds, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if steps == 0:
    return result
  state, metrics = compiled(state, batch, jax.random.key(1))
  jax.block_until_ready(metrics)
  reset = _reset_peak_rss()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  result.update(times=times, loss=float(metrics["loss"]),
                steps_peak_mib=_hwm_mib() if reset else float("nan"))
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:  # accelerators: the device's own high-water mark
    result["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
  return result


def torch_worker(job: dict) -> dict:
  """Times the twin's step (one warm-up step, counted by torch's FlopCounterMode, then `steps`)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_twin  # pylint: disable=g-import-not-at-top  (launch/benchmarks/ is sys.path[0])
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top

  spec, batch_size, steps = job["spec"], job["batch_size"], job["steps"]
  density, species = _data(spec["grid"], spec["max_z"], batch_size)
  density, species = torch.from_numpy(density), torch.from_numpy(species)
  start = time.perf_counter()
  trainer = torch_twin.Trainer(spec, channels_last=job["impl"] == "channels_last")
  init_seconds = time.perf_counter() - start
  counter = FlopCounterMode(display=False)
  with counter:
    metrics = trainer.step(density, species)
  reset = _reset_peak_rss()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    metrics = trainer.step(density, species)
    float(metrics["loss"])
    times.append(time.perf_counter() - start)
  return {"params": torch_twin.num_params(trainer.model), "times": times,
          "loss": float(metrics["loss"]), "torch_counted_flops": float(counter.get_total_flops()),
          "threads": torch.get_num_threads(), "init_seconds": init_seconds,
          "compile_seconds": 0.0, "steps_peak_mib": _hwm_mib() if reset else float("nan")}


def check_worker(job: dict) -> dict:
  """The Flax parameters copied into the twin: loss terms, outputs and gradients compared."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch_twin  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from crystal_vae import train  # pylint: disable=g-import-not-at-top

  config = _config(job["model"])  # conv_impl "auto": fft or depth_sum per layer on CPU
  spec = spec_of(config)
  density, species = _data(config.voxel.grid, config.dataset.max_z, job["batch_size"])
  batch = {"density": jnp.asarray(density), "species": jnp.asarray(species)}
  state = train.create_train_state(config, jax.random.key(0))
  key = jax.random.key(3)
  eps = np.asarray(jax.random.normal(key, (density.shape[0], config.model.latent_dim)))

  def loss_fn(params):  # train.train_step's loss_fn with a fixed sampling key
    outputs, _ = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["density"], key, train=True,
        unet_grad_scale=config.loss.gamma, teacher_forcing=config.loss.teacher_forcing > 0,
        mutable=["batch_stats"])
    terms = train.voxel_losses(outputs, batch, config)
    return train.total_loss(terms, config), (terms, outputs)

  (loss, (terms, outputs)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      state.params)
  trainer = torch_twin.Trainer(spec)
  torch_twin.load_flax_params(trainer.model, jax.tree.map(np.asarray, state.params))
  t_loss, t_terms, t_outputs = trainer.loss_and_terms(
      torch.from_numpy(density), torch.from_numpy(species), eps=torch.from_numpy(eps))
  t_loss.backward()

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))

  report = {"loss_jax": float(loss), "loss_torch": float(t_loss)}
  for name in ("mse", "kl", "seg", "seg_true"):
    if name in terms:
      report[f"rel_{name}"] = rel(terms[name], t_terms[name].detach().numpy())
  report["rel_recon"] = rel(outputs["recon"], t_outputs["recon"].detach().numpy())
  if "segmented" in outputs:
    report["rel_segmented"] = rel(outputs["segmented"],
                                  t_outputs["segmented"].detach().permute(0, 2, 3, 4, 1).numpy())
  jax_grads = {"/".join(k): v for k, v in traverse_util.flatten_dict(grads).items()}
  torch_grads = torch_twin.flax_named_grads(trainer.model)
  if set(jax_grads) != set(torch_grads):
    raise ValueError(f"parameter paths differ: {set(jax_grads) ^ set(torch_grads)}")
  errors = {k: rel(jax_grads[k], torch_grads[k].numpy()) for k in jax_grads}
  worst = max(errors, key=errors.get)
  report.update(grad_tensors=len(errors), worst_grad=worst, rel_worst_grad=errors[worst],
                median_rel_grad=float(np.median(list(errors.values()))))
  return report


# -------------------------------------------------------------------------------------- parent

@dataclasses.dataclass
class Row:
  model: str
  framework: str
  impl: str
  result: dict | None
  error: str = ""


def _run_worker(job: dict, xla_flags: str = "") -> tuple[dict | None, str]:
  env = dict(os.environ)
  if xla_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--worker={json.dumps(job)}"],
                        env=env, capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
      result["peak_rss_mib"] = result.get("peak_rss_mib", float("nan"))
      return result, ""
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return None, f"exit {proc.returncode}: {' | '.join(tail)}"


def _jax_param_count(config) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from crystal_vae import models  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: models.init_variables(config, jax.random.key(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def _twin_param_count(spec: dict) -> int:
  import torch_twin  # pylint: disable=g-import-not-at-top
  return torch_twin.num_params(torch_twin.CrystalVAE(spec))


def _fmt(value: float, digits: int) -> str:
  return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def main(argv):
  del argv
  if _WORKER.value:
    job = json.loads(_WORKER.value)
    worker = {"jax": jax_worker, "torch": torch_worker, "check": check_worker}[job["framework"]]
    result = worker(job)
    result["peak_rss_mib"] = _max_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)
    return

  frameworks = list(_FRAMEWORKS.value)
  has_torch = importlib.util.find_spec("torch") is not None
  if "torch" in frameworks and not has_torch:
    print(f"PyTorch not installed: skipping the PyTorch twin (pip install {TORCH_PIN})")
    frameworks.remove("torch")
  for variant in _JAX_VARIANTS.value:
    _variant_options(variant)  # fail early on a typo
  import jax  # pylint: disable=g-import-not-at-top
  torch_version = importlib.metadata.version("torch") if has_torch else "not installed"
  print(f"devices: {jax.devices()}  cpus: {os.cpu_count()}  machine: "
        f"{platform.processor() or platform.machine()}  jax {jax.__version__}  torch "
        f"{torch_version}")
  print(f"load average at start: {os.getloadavg()[0]:.2f} (1 min)  XLA_FLAGS extra: "
        f"{_XLA_FLAGS.value or '-'}")
  print(f"batch {_BATCH.value}, median of {_STEPS.value} steps after a warm-up step, "
        f"{_ROUNDS.value} round(s); one subprocess per row\n", flush=True)

  specs, notes = {}, []
  for model in _MODELS.value:
    config = _config(model)
    jax_params = _jax_param_count(config)
    line = f"{model}: parameters JAX {jax_params:,}"
    if "torch" in frameworks:
      specs[model] = spec_of(config)
      twin_params = _twin_param_count(specs[model])
      same = "equal" if twin_params == jax_params else "DIFFERENT"
      line += f", PyTorch twin {twin_params:,} ({same})"
    print(line, flush=True)
    if _CHECK_TWIN.value and "torch" in frameworks:
      report, error = _run_worker({"framework": "check", "model": model, "batch_size": 2})
      if report is None:
        print(f"{model}: twin check failed: {error}")
      else:
        print(f"{model}: twin check (Flax params copied in, batch 2): loss JAX "
              f"{report['loss_jax']:.6f} PyTorch {report['loss_torch']:.6f}; max rel. error "
              + ", ".join(f"{k[4:]} {v:.1e}" for k, v in report.items()
                          if k.startswith("rel_") and k != "rel_worst_grad")
              + f"; gradients of {report['grad_tensors']} tensors: median "
              f"{report['median_rel_grad']:.1e}, worst {report['rel_worst_grad']:.1e} "
              f"({report['worst_grad']})", flush=True)
  print()

  jobs = []
  for model in _MODELS.value:
    if "jax" in frameworks:
      for impl in _IMPLS.value:
        for variant in _JAX_VARIANTS.value:
          label = impl if variant == "base" else f"{impl}+{variant}"
          jobs.append((model, "jax", label, {"framework": "jax", "model": model, "impl": impl,
                                             "variant": variant}, _variant_options(variant)))
    if "torch" in frameworks:
      for impl in _TORCH_IMPLS.value:
        jobs.append((model, "torch", impl, {"framework": "torch", "model": model, "impl": impl,
                                            "spec": specs[model]}, {}))

  print("| model | framework | impl | samples/s | s/step | GFLOP/sample | achieved GFLOP/s |"
        " peak RSS MiB | steps peak RSS MiB | compile/init s |")
  print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
  rows, xla_flops = [], {}
  for _ in range(_ROUNDS.value):
    for model, framework, label, job, options in jobs:
      job = dict(job, batch_size=_BATCH.value, steps=_STEPS.value)
      xla_flags = f"{_XLA_FLAGS.value} {options.get('xla_flags', '')}".strip()
      result, error = _run_worker(job, xla_flags if framework == "jax" else "")
      row = Row(model, framework, label, result, error)
      rows.append(row)
      if result is None:
        print(f"| {model} | {framework} | {label} | failed: {error} |||||||", flush=True)
        continue
      if model not in xla_flops:
        # One count per model for every row: XLA's cost analysis of the step with depth_sum
        # convolutions (it counts neither custom calls, the native convolution, nor an FFT's
        # work as the convolution's), compiled only.
        flops_job = {"framework": "jax", "model": model, "impl": "depth_sum",
                     "variant": "base", "batch_size": _BATCH.value, "steps": 0}
        flops_result, _ = _run_worker(flops_job, _XLA_FLAGS.value)
        xla_flops[model] = flops_result["flops"] if flops_result else float("nan")
      flops = xla_flops[model]
      seconds = float(np.median(result["times"]))  # a shared machine's outliers left out
      result["samples_per_second"] = _BATCH.value / seconds
      print(f"| {model} | {'JAX' if framework == 'jax' else 'PyTorch'} | {label} |"
            f" {result['samples_per_second']:.2f} | {seconds:.3f} |"
            f" {flops / _BATCH.value / 1e9:.2f} | {flops / seconds / 1e9:.1f} |"
            f" {result['peak_rss_mib']:.0f} | {_fmt(result['steps_peak_mib'], 0)} |"
            f" {result['compile_seconds'] + result['init_seconds']:.1f} |", flush=True)
      if "device_peak_mib" in result:
        notes.append(f"{model} {label}: device peak memory {result['device_peak_mib']:.0f} MiB")
      if framework == "torch":
        notes.append(f"{model} PyTorch {label}: {result['threads']} threads, torch FlopCounter "
                     f"(conv/matmul only) {result['torch_counted_flops'] / _BATCH.value / 1e9:.2f}"
                     f" GFLOP/sample; per-step s {[round(t, 3) for t in result['times']]}")
      else:
        notes.append(f"{model} JAX {label}: per-step s {[round(t, 3) for t in result['times']]}")

  print()
  for model in _MODELS.value:
    best = {}
    for row in rows:
      if row.model == model and row.result is not None:
        sps = row.result["samples_per_second"]
        if sps > best.get(row.framework, (0.0, ""))[0]:
          best[row.framework] = (sps, row.impl)
    if "jax" in best and "torch" in best:
      (j, jl), (t, tl) = best["jax"], best["torch"]
      print(f"{model}: JAX / PyTorch samples/s = {j:.2f} ({jl}) / {t:.2f} ({tl}) = {j / t:.2f}")
  print(f"\nload average at end: {os.getloadavg()[0]:.2f} (1 min; {os.cpu_count()} cpus, shared)")
  for note in notes:
    print(note)


if __name__ == "__main__":
  process_settings.apply()  # here and in every worker
  app.run(main)
