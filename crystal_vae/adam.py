"""The training optimiser: Adam on a learning-rate schedule, after optional global-norm clipping,
its steps scaled per parameter path; on the CPU one fused native step per parameter array.

`optimizer(config)` is the optax transformation a `train.TrainState` holds; `apply_gradients`
takes its steps (the native `kernels.adam` where it can, with optax's values and state).
Config fields read: learning_rate, lr_schedule, warmup_steps, num_train_steps,
final_learning_rate_fraction, grad_clip_norm, lr_mults.
"""

import re
from collections.abc import Sequence
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from crystal_vae.native import kernels

LR_SCHEDULES = ("constant", "warmup_cosine")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """`config.learning_rate`, constant (paper) or after a linear warm-up over `warmup_steps` a
  cosine decay to `final_learning_rate_fraction` of it at `num_train_steps`."""
  if config.lr_schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  if config.lr_schedule != "warmup_cosine":
    raise ValueError(f"lr_schedule {config.lr_schedule!r} not in {LR_SCHEDULES}")
  # A run shorter than its warm-up (e.g. a smoke test) ends during the warm-up.
  return optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps,
      max(config.num_train_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.final_learning_rate_fraction)


ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # Adam's usual constants (optax's, PyTorch's)


def path_multipliers(lr_mults: Sequence[tuple[str, float]], tree: Any) -> Any:
  """Each leaf's learning-rate multiplier: that of the first `(regex, multiplier)` pair whose
  regex matches its path ("encoder/mean/kernel"), else 1."""
  patterns = [(re.compile(pattern), float(multiplier)) for pattern, multiplier in lr_mults]

  def multiplier(path, _) -> float:
    name = "/".join(str(getattr(key, "key", key)) for key in path)
    return next((m for pattern, m in patterns if pattern.search(name)), 1.0)

  return jax.tree_util.tree_map_with_path(multiplier, tree)


def scale_by_path(lr_mults: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its `path_multipliers`."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, path_multipliers(lr_mults, updates)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on the learning-rate schedule, after clipping the global gradient norm to
  `grad_clip_norm` (0: no clipping, as in the paper), its steps scaled per parameter by
  `lr_mults`. `apply_gradients` takes its steps."""
  transforms = [optax.adam(learning_rate_schedule(config), b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)]
  if config.grad_clip_norm > 0:
    transforms.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
  if config.lr_mults:
    transforms.append(scale_by_path(config.lr_mults))
  return optax.chain(*transforms) if len(transforms) > 1 else transforms[0]


def _is_counted_state(tree: Any) -> bool:
  return isinstance(tree, (optax.ScaleByAdamState, optax.ScaleByScheduleState))


def apply_gradients(state: train_state.TrainState, grads: Any, batch_stats: Any,
                    config: ml_collections.ConfigDict
                    ) -> tuple[train_state.TrainState, jax.Array]:
  """`state` (a `train.TrainState`) after one step of `optimizer(config)` on `grads`, with
  `batch_stats` as its batch statistics, and the gradients' global norm.

  On the CPU with the native kernels (float32 parameters), `kernels.adam` does optax's arithmetic
  (clipping, Adam, the schedule, the multipliers) in one pass over each array, in place of
  optax's several (the paper model's step: 4% faster): the same values (to float rounding) and
  the same optimiser state, so checkpoints carry over."""
  params, treedef = jax.tree.flatten(state.params)
  if not kernels.on_cpu() or any(p.dtype != jnp.float32 for p in params):
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), optax.tree.norm(grads)
  grads = treedef.flatten_up_to(grads)
  counted = [s for s in jax.tree.leaves(state.opt_state, is_leaf=_is_counted_state)
             if _is_counted_state(s)]
  (adam_state,) = [s for s in counted if isinstance(s, optax.ScaleByAdamState)]
  (schedule_state,) = [s for s in counted if isinstance(s, optax.ScaleByScheduleState)]
  count = optax.safe_increment(adam_state.count)
  learning_rate = learning_rate_schedule(config)(schedule_state.count)
  steps = jnp.stack([-learning_rate * multiplier for multiplier in
                     jax.tree.leaves(path_multipliers(config.lr_mults, state.params))])
  clip = (1.0, 1.0)
  if config.grad_clip_norm > 0:  # optax.clip_by_global_norm: g / norm * max_norm above max_norm
    norm = jnp.sqrt(kernels.sum_of_squares(grads))
    above = norm >= config.grad_clip_norm
    clip = (jnp.where(above, norm, 1.0), jnp.where(above, config.grad_clip_norm, 1.0))
  params, mus, nus, squares = kernels.adam(
      params, grads, treedef.flatten_up_to(adam_state.mu), treedef.flatten_up_to(adam_state.nu),
      steps, (1 - ADAM_B1 ** count, 1 - ADAM_B2 ** count), clip,
      b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)
  if config.grad_clip_norm <= 0:
    norm = jnp.sqrt(squares)
  stepped = {optax.ScaleByAdamState: optax.ScaleByAdamState(
                 count=count, mu=treedef.unflatten(mus), nu=treedef.unflatten(nus)),
             optax.ScaleByScheduleState: optax.ScaleByScheduleState(
                 count=optax.safe_increment(schedule_state.count))}
  opt_state = jax.tree.map(lambda s: stepped.get(type(s), s), state.opt_state,
                           is_leaf=_is_counted_state)
  return state.replace(step=state.step + 1, params=treedef.unflatten(params), opt_state=opt_state,
                       batch_stats=batch_stats), norm
