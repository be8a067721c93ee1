"""The optimizer: SGD with momentum, L2 weight decay and an optional L1 penalty.

Both penalties are added to the gradient before the SGD update, which is the same as
adding `weight_decay/2 * ||w||²` and `l1 * |w|` to the loss. They apply to conv and
dense kernels only: penalizing biases and batch-norm scales does not regularize.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def kernel_mask(params: Any) -> Any:
  """True for weight matrices and conv kernels (leaves named 'kernel')."""
  def is_kernel(path, _):
    return getattr(path[-1], "key", None) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


class _L1State(NamedTuple):
  pass


def add_l1_subgradient(l1: float) -> optax.GradientTransformation:
  """Adds `l1 * sign(w)`: the (sub)gradient of an `l1 * |w|` penalty."""
  def init(params):
    del params
    return _L1State()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("add_l1_subgradient needs params in update().")
    updates = jax.tree.map(lambda g, w: g + l1 * jnp.sign(w).astype(g.dtype),
                           updates, params)
    return updates, state

  return optax.GradientTransformation(init, update)


def learning_rate_schedule(optim_config, steps_per_epoch: int, num_epochs: int):
  total = max(1, steps_per_epoch * num_epochs)
  warmup = int(round(optim_config.warmup_epochs * steps_per_epoch))
  lr = optim_config.learning_rate
  if optim_config.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif optim_config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
  else:
    raise ValueError(f"Unknown optim.schedule '{optim_config.schedule}'; use "
                     "'constant' or 'cosine'.")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], boundaries=[warmup])


def create_optimizer(optim_config, steps_per_epoch: int,
                     num_epochs: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim_config, steps_per_epoch, num_epochs)
  parts = []
  if optim_config.l1 > 0:
    parts.append(optax.masked(add_l1_subgradient(optim_config.l1), kernel_mask))
  if optim_config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim_config.weight_decay, mask=kernel_mask))
  parts.append(optax.sgd(schedule, momentum=optim_config.momentum or None,
                         nesterov=optim_config.nesterov))
  return optax.chain(*parts)
