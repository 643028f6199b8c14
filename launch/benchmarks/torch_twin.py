"""PyTorch CPU twin of `crystal_vae.models.CrystalVAE` and `train.train_step`, for benchmarks only.

Layer for layer the same as the Flax model (Encoder, Decoder, AttentionUNet, same parameter
count and shapes; module names mirror the Flax parameter paths, e.g. `unet.ConvBlock_0.Conv3D_1`,
so `load_flax_params` copies a Flax tree in) and the same step: encoder -> z = mean +
exp(logvar / 2) eps -> decoder (trilinear x2 upsampling + convs) -> U-Net on the decoded density
behind a gradient scaled by γ (+ the teacher-forcing U-Net pass on the true density), loss
MSE + β KL + species loss (+ weighted seg_true, site-Z), the step's metrics, global-norm
clipping where configured and Adam (optax's defaults: b1 0.9, b2 0.999, eps 1e-8).

The model is built from a plain dict (`spec_of` in benchmark_train.py) so that this module
imports neither JAX nor crystal_vae: a process timing it holds only PyTorch. Layout: NCDHW
tensors, optionally in the channels_last_3d memory format (`channels_last`). Not supported
(the benchmark refuses them): lattice/composition/property heads, conditional models,
lr_mults, non-float32 dtypes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Z_SCALE = 10.0  # models.Z_SCALE


def decoder_sizes(grid, start, kernels, paddings):
  """models.decoder_sizes: cube sides after each upsampling round and the final VALID kernel."""
  sizes, size = [], start
  for kernel, padding in zip(kernels, paddings, strict=True):
    size = 2 * size - (kernel - 1 if padding == "VALID" else 0)
    sizes.append(size)
  if size < grid:
    raise ValueError(f"decoder sides {sizes} cannot reach grid {grid}")
  return sizes, size - grid + 1


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """lax.padtype_to_pads for SAME along one axis: (low, high)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class Conv3D(nn.Module):
  """models.Conv3D: k³ conv, SAME (XLA's asymmetric padding: the extra voxel at the high end)
  or VALID; weight (out, in, k, k, k) = the Flax kernel (k, k, k, in, out) transposed."""

  def __init__(self, in_features, features, kernel, stride=1, padding="SAME", use_bias=True):
    super().__init__()
    self.kernel, self.stride, self.padding = kernel, stride, padding
    self.weight = nn.Parameter(torch.empty(features, in_features, kernel, kernel, kernel))
    fan_in = in_features * kernel ** 3  # lecun_normal (truncated normal in Flax; scale only)
    nn.init.normal_(self.weight, std=1.0 / math.sqrt(fan_in))
    self.bias = nn.Parameter(torch.zeros(features)) if use_bias else None

  def forward(self, x):
    if self.padding == "VALID":
      return F.conv3d(x, self.weight, self.bias, self.stride)
    pads = [_same_pads(side, self.kernel, self.stride) for side in x.shape[2:]]
    if all(low == high for low, high in pads):
      return F.conv3d(x, self.weight, self.bias, self.stride, [low for low, _ in pads])
    x = F.pad(x, [p for low_high in reversed(pads) for p in low_high])  # W, H, D order
    return F.conv3d(x, self.weight, self.bias, self.stride)


def _batch_norm(features):
  # Flax nn.BatchNorm: momentum 0.99 (torch's 0.01), epsilon 1e-5, scale and bias.
  return nn.BatchNorm3d(features, eps=1e-5, momentum=0.01)


def _resize(x, spatial):
  """native.ops.resize: trilinear, half-pixel centres (all uses here upsample)."""
  return F.interpolate(x, size=tuple(spatial), mode="trilinear", align_corners=False)


class _ScaleGradient(torch.autograd.Function):
  """models.scale_gradient: identity whose backward multiplies the cotangent by `scale`."""

  @staticmethod
  def forward(ctx, x, scale):
    ctx.scale = scale
    return x.view_as(x)

  @staticmethod
  def backward(ctx, cotangent):
    return cotangent * ctx.scale, None


class Encoder(nn.Module):

  def __init__(self, spec):
    super().__init__()
    layers, channels = {}, 1
    for i, (features, kernel, stride) in enumerate(zip(
        spec["encoder_features"], spec["encoder_kernels"], spec["encoder_strides"], strict=True)):
      layers[f"Conv3D_{i}"] = Conv3D(channels, features, kernel, stride, "SAME", use_bias=False)
      layers[f"BatchNorm_{i}"] = _batch_norm(features)
      channels = features
    self.layers = nn.ModuleDict(layers)
    self.depth = len(spec["encoder_features"])
    side = spec["grid"]
    for stride in spec["encoder_strides"]:
      side = -(-side // stride)
    flat = side ** 3 * channels
    self.mean = nn.Linear(flat, spec["latent_dim"])
    self.logvar = nn.Linear(flat, spec["latent_dim"])

  def forward(self, density):
    x = density[:, None]
    for i in range(self.depth):
      x = F.leaky_relu(self.layers[f"BatchNorm_{i}"](self.layers[f"Conv3D_{i}"](x)))
    x = x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1)  # flatten channels-last, as Flax does
    return self.mean(x), self.logvar(x)


class Decoder(nn.Module):

  def __init__(self, spec):
    super().__init__()
    self.start = spec["decoder_start"]
    self.start_features = spec["encoder_features"][-1]
    self.grid = spec["grid"]
    _, final_kernel = decoder_sizes(spec["grid"], self.start, spec["decoder_kernels"],
                                    spec["decoder_paddings"])
    layers = {"Dense_0": nn.Linear(spec["latent_dim"], self.start ** 3 * self.start_features)}
    channels = self.start_features
    self.rounds = len(spec["decoder_features"])
    for i, (features, kernel, padding) in enumerate(zip(
        spec["decoder_features"], spec["decoder_kernels"], spec["decoder_paddings"],
        strict=True)):
      layers[f"Conv3D_{i}"] = Conv3D(channels, features, kernel, 1, padding)
      channels = features
    layers[f"Conv3D_{self.rounds}"] = Conv3D(channels, 1, final_kernel, 1, "VALID")
    self.layers = nn.ModuleDict(layers)
    self.output = F.relu if spec["decoder_output"] == "relu" else F.softplus

  def forward(self, z, memory_format=torch.contiguous_format):
    s = self.start
    x = self.layers["Dense_0"](z).reshape(z.shape[0], s, s, s, self.start_features)
    x = x.permute(0, 4, 1, 2, 3).contiguous(memory_format=memory_format)
    for i in range(self.rounds):
      x = _resize(x, [2 * side for side in x.shape[2:]])
      x = F.leaky_relu(self.layers[f"Conv3D_{i}"](x))
    x = self.layers[f"Conv3D_{self.rounds}"](x)[:, 0]
    return self.output(x)


class ConvBlock(nn.Module):

  def __init__(self, in_features, features):
    super().__init__()
    self.Conv3D_0 = Conv3D(in_features, features, 3, 1, "SAME", use_bias=False)
    self.BatchNorm_0 = _batch_norm(features)
    self.Conv3D_1 = Conv3D(features, features, 3, 1, "SAME", use_bias=False)
    self.BatchNorm_1 = _batch_norm(features)

  def forward(self, x):
    x = F.relu(self.BatchNorm_0(self.Conv3D_0(x)))
    return F.relu(self.BatchNorm_1(self.Conv3D_1(x)))


class AttentionGate(nn.Module):

  def __init__(self, skip_features, gate_features, features):
    super().__init__()
    self.theta = Conv3D(skip_features, features, 2, 2, "SAME")
    self.phi = Conv3D(gate_features, features, 1, 1, "SAME")
    self.psi = Conv3D(features, 1, 1, 1, "SAME")

  def forward(self, skip, gate):
    alpha = torch.sigmoid(self.psi(F.relu(self.theta(skip) + self.phi(gate))))
    return skip * _resize(alpha, skip.shape[2:])


class AttentionUNet(nn.Module):

  def __init__(self, features, num_outputs):
    super().__init__()
    self.features = tuple(features)
    layers, channels, block = {}, 1, 0
    for f in self.features:  # down: ConvBlock_0 .. ConvBlock_{n-1}
      layers[f"ConvBlock_{block}"] = ConvBlock(channels, f)
      channels, block = f, block + 1
    for gate, level in enumerate(reversed(range(len(self.features) - 1))):
      f = self.features[level]
      layers[f"AttentionGate_{gate}"] = AttentionGate(f, channels, f)
      layers[f"ConvBlock_{block}"] = ConvBlock(f + channels, f)
      channels, block = f, block + 1
    layers["Conv3D_0"] = Conv3D(channels, num_outputs, 1, 1, "SAME")
    self.layers = nn.ModuleDict(layers)

  def forward(self, density, memory_format=torch.contiguous_format):
    x = density[:, None].contiguous(memory_format=memory_format)
    skips, block = [], 0
    for level in range(len(self.features)):
      if level:
        x = F.max_pool3d(x, 2, 2, ceil_mode=True)  # SAME max-pooling (30 -> 15 -> 8 -> 4)
      x = self.layers[f"ConvBlock_{block}"](x)
      skips.append(x)
      block += 1
    for gate, level in enumerate(reversed(range(len(self.features) - 1))):
      skip = skips[level]
      gated = self.layers[f"AttentionGate_{gate}"](skip, x)
      x = torch.cat([gated, _resize(x, skip.shape[2:])], dim=1)
      x = self.layers[f"ConvBlock_{block}"](x)
      block += 1
    return self.layers["Conv3D_0"](x)  # (B, C, G, G, G)


class CrystalVAE(nn.Module):

  def __init__(self, spec):
    super().__init__()
    self.spec = spec
    self.encoder = Encoder(spec)
    self.decoder = Decoder(spec)
    if spec["segmenter"]:
      outputs = spec["max_z"] + 1 if spec["species_head"] == "classes" else 2
      self.unet = AttentionUNet(spec["unet_features"], outputs)
    self.memory_format = torch.contiguous_format

  def forward(self, density, *, unet_grad_scale=1.0, teacher_forcing=False, eps=None):
    mean, logvar = self.encoder(density.contiguous(memory_format=torch.contiguous_format))
    if eps is None:
      eps = torch.randn_like(mean)
    z = mean + torch.exp(logvar / 2) * eps
    recon = self.decoder(z, self.memory_format)
    outputs = dict(mean=mean, logvar=logvar, z=z, recon=recon)
    if self.spec["segmenter"]:
      outputs["segmented"] = self.unet(_ScaleGradient.apply(recon, unet_grad_scale),
                                       self.memory_format)
      if teacher_forcing:
        outputs["segmented_true"] = self.unet(density, self.memory_format)
    return outputs


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# --- losses (losses.py, train.voxel_losses / total_loss), outputs channels-first (B, C, ...) ---

def _per_example(values, where):
  axes = tuple(range(1, values.ndim))
  where = where.to(values.dtype)
  return (values * where).sum(axes) / where.sum(axes).clamp_min(1.0)


def _voxel_mean(values, atoms, balanced):
  if not balanced:
    return values.mean(tuple(range(1, values.ndim)))
  return 0.5 * (_per_example(values, atoms) + _per_example(values, ~atoms))


def species_loss(outputs, species, *, species_head, balanced, z_weight):
  atoms = species > 0
  if species_head == "classes":
    ce = F.cross_entropy(outputs, species.long(), reduction="none")
    return _voxel_mean(ce, atoms, balanced)
  logit, z = outputs[:, 0], outputs[:, 1]
  mask = F.binary_cross_entropy_with_logits(logit, atoms.to(logit.dtype), reduction="none")
  z_error = (z - species.to(z.dtype) / Z_SCALE) ** 2
  return _voxel_mean(mask, atoms, balanced) + z_weight * _per_example(z_error, atoms)


def species_grid(outputs, species_head, max_z):
  if species_head == "classes":
    return outputs.argmax(1).to(torch.int32)
  z = torch.clamp(torch.round(outputs[:, 1] * Z_SCALE), 1, max_z).to(torch.int32)
  return torch.where(outputs[:, 0] > 0, z, torch.zeros_like(z))


def _site_z_kernel(grid, box, sigma):
  centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * box / grid
  gaussian = torch.exp(-(centres[:, None] - centres[None, :]) ** 2 / (2.0 * sigma ** 2))
  offsets = torch.arange(-grid, grid + 1, dtype=torch.float64) * box / grid
  self_overlap = torch.exp(-offsets ** 2 / sigma ** 2).sum() ** 3 / (
      sigma ** 3 * (2.0 * math.pi) ** 1.5)
  return (gaussian / self_overlap ** (1.0 / 3.0)).float()


def voxel_losses(outputs, density, species, spec, site_kernel):
  """train.voxel_losses: per-example loss terms (B,) and, without gradient, the accuracies."""
  loss = spec["loss"]
  axes = (1, 2, 3)
  terms = {"mse": ((outputs["recon"] - density) ** 2).mean(axes)}
  mean, logvar = outputs["mean"], outputs["logvar"]
  terms["kl"] = 0.5 * (torch.exp(logvar) + mean ** 2 - 1.0 - logvar).sum(-1)
  seg = lambda o: species_loss(o, species, species_head=spec["species_head"],
                               balanced=loss["balanced"], z_weight=loss["z_weight"])
  if "segmented" in outputs:
    terms["seg"] = seg(outputs["segmented"])
  if "segmented_true" in outputs:
    terms["seg_true"] = seg(outputs["segmented_true"])
  z_error = torch.einsum("bxyz,xi,yj,zk->bijk", outputs["recon"] - density, site_kernel,
                         site_kernel, site_kernel)
  atoms = species > 0
  terms["site_z_mse"] = _per_example(z_error ** 2, atoms)
  with torch.no_grad():
    terms["site_z_right"] = _per_example((z_error.abs() < 0.5).float(), atoms)
    if "segmented" not in outputs:
      return terms
    predicted = species_grid(outputs["segmented"], spec["species_head"], spec["max_z"])
    correct = predicted == species
    terms["voxel_accuracy"] = correct.float().mean(axes)
    terms["atom_voxel_correct"] = (correct & atoms).sum(axes)
    terms["atom_voxel_found"] = ((predicted > 0) & atoms).sum(axes)
    terms["atom_voxels"] = atoms.sum(axes)
    terms["empty_voxel_accuracy"] = ((predicted == 0) & ~atoms).sum(axes) / (
        (~atoms).sum(axes).clamp_min(1))
  return terms


def total_loss(terms, spec):
  loss = spec["loss"]
  value = terms["mse"] + loss["beta"] * terms["kl"] + loss["site_z_weight"] * terms["site_z_mse"]
  if "seg" in terms:
    value = value + terms["seg"]
  if "seg_true" in terms:
    value = value + loss["teacher_forcing"] * terms["seg_true"]
  return value.mean()


def learning_rate(spec, step: int) -> float:
  """adam.learning_rate_schedule (optax constant or warmup_cosine_decay_schedule)."""
  lr = spec["learning_rate"]
  if spec["lr_schedule"] == "constant":
    return lr
  warmup, total = spec["warmup_steps"], max(spec["num_train_steps"], spec["warmup_steps"] + 1)
  if step < warmup:
    return lr * step / warmup
  end = lr * spec["final_learning_rate_fraction"]
  progress = min(step - warmup, total - warmup) / (total - warmup)
  return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
  """One `train.train_step` per `step(density, species)`: the same forward, loss, metrics,
  clipping and Adam update (PyTorch's fused CPU Adam where available)."""

  def __init__(self, spec: dict[str, Any], *, channels_last: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    self.spec = spec
    self.model = CrystalVAE(spec)
    if channels_last:
      self.model = self.model.to(memory_format=torch.channels_last_3d)
      self.model.memory_format = torch.channels_last_3d
    self.model.train()
    self.site_kernel = _site_z_kernel(spec["grid"], spec["box"], spec["sigma"])
    try:
      self.optimizer = torch.optim.Adam(self.model.parameters(), lr=spec["learning_rate"],
                                        betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
      self.optimizer = torch.optim.Adam(self.model.parameters(), lr=spec["learning_rate"],
                                        betas=(0.9, 0.999), eps=1e-8, foreach=True)
    self.step_count = 0

  def loss_and_terms(self, density, species, eps=None):
    loss_spec = self.spec["loss"]
    outputs = self.model(density, unet_grad_scale=loss_spec["gamma"],
                         teacher_forcing=loss_spec["teacher_forcing"] > 0, eps=eps)
    terms = voxel_losses(outputs, density, species, self.spec, self.site_kernel)
    return total_loss(terms, self.spec), terms, outputs

  def step(self, density, species) -> dict[str, torch.Tensor]:
    for group in self.optimizer.param_groups:
      group["lr"] = learning_rate(self.spec, self.step_count)
    self.optimizer.zero_grad(set_to_none=True)
    loss, terms, _ = self.loss_and_terms(density, species)
    loss.backward()
    params = [p for p in self.model.parameters() if p.grad is not None]
    clip = self.spec["grad_clip_norm"]
    if clip > 0:
      grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    else:  # the step's grad_norm metric only
      grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    self.optimizer.step()
    self.step_count += 1
    with torch.no_grad():
      metrics = {k: v.float().mean() for k, v in terms.items()
                 if k not in ("atom_voxel_correct", "atom_voxel_found", "atom_voxels")}
      if "atom_voxels" in terms:
        atom_voxels = terms["atom_voxels"].sum().clamp_min(1)
        metrics["atom_voxel_accuracy"] = terms["atom_voxel_correct"].sum() / atom_voxels
        metrics["atom_voxel_recall"] = terms["atom_voxel_found"].sum() / atom_voxels
      metrics["loss"] = loss.detach()
      metrics["grad_norm"] = grad_norm
    return metrics


# --- Flax parameter tree -> twin (for the layer-for-layer check) ---

def load_flax_params(model: CrystalVAE, params: dict[str, Any]) -> None:
  """Copies a Flax `params` tree (numpy leaves) into the twin: conv kernels (k,k,k,in,out) ->
  (out,in,k,k,k), Dense kernels (in,out) -> (out,in), BatchNorm scale -> weight."""
  state = model.state_dict()
  seen = set()

  def visit(tree, path):
    for key, value in tree.items():
      if isinstance(value, dict):
        visit(value, path + [key])
        continue
      module = ".".join(_torch_path(path))
      if key == "kernel":
        value = torch.as_tensor(value)
        value = value.permute(4, 3, 0, 1, 2) if value.ndim == 5 else value.T
        name = f"{module}.weight"
      elif key == "scale":
        name, value = f"{module}.weight", torch.as_tensor(value)
      else:
        name, value = f"{module}.{key}", torch.as_tensor(value)
      if name not in state or tuple(state[name].shape) != tuple(value.shape):
        raise KeyError(f"Flax {'/'.join(path + [key])} {tuple(value.shape)} has no twin "
                       f"({name} {tuple(state[name].shape) if name in state else 'missing'})")
      state[name].copy_(value)
      seen.add(name)

  with torch.no_grad():
    visit(params, [])
  missing = {n for n, _ in model.named_parameters()} - seen
  if missing:
    raise KeyError(f"twin parameters not in the Flax tree: {sorted(missing)}")


def _torch_path(path):
  top, rest = path[0], path[1:]
  if top == "encoder" and rest[0] not in ("mean", "logvar"):
    return [top, "layers", *rest]
  if top in ("decoder", "unet"):
    return [top, "layers", *rest]
  return path


def flax_named_grads(model: CrystalVAE) -> dict[str, torch.Tensor]:
  """The twin's gradients keyed by their Flax path ('encoder/Conv3D_0/kernel'), in Flax layout."""
  out = {}
  for name, p in model.named_parameters():
    parts = [s for s in name.split(".") if s != "layers"]
    leaf = parts[-1]
    grad = p.grad
    if leaf == "weight" and grad.ndim == 5:
      key, grad = "kernel", grad.permute(2, 3, 4, 1, 0)
    elif leaf == "weight" and grad.ndim == 2:
      key, grad = "kernel", grad.T
    elif leaf == "weight":
      key = "scale"
    else:
      key = leaf
    out["/".join(parts[:-1] + [key])] = grad
  return out
