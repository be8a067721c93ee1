"""The optimizer: SGD with momentum or AdamW, weight decay, optional L1, clipping, freezing.

With SGD both penalties are added to the gradient before the update, which is the same
as adding `weight_decay/2 * ||w||²` and `l1 * |w|` to the loss. With AdamW the weight
decay is decoupled (Loshchilov & Hutter): `learning_rate × weight_decay × w` comes off
the weights each step, outside Adam's scaling; L1 is still added to the gradient. By
default both apply to conv and dense kernels only (`optim.decay_leaves`): penalizing
biases and batch-norm scales does not regularize.

Parameters come in two groups, {"backbone", "head"}. When the backbone is frozen or
has its own learning rate, each group gets its own SGD chain (`optax.partition`); a
frozen backbone's chain is masked (`optax.conditionally_mask`): its updates are exactly
zero and its momentum untouched until the unfreeze step, so frozen weights come out
bit-identical and start fine-tuning with clean momentum.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

# The frozen backbone's step counter never reaches this: frozen for the whole run.
_NEVER = int(jnp.iinfo(jnp.int32).max)


def leaf_mask(names: Sequence[str]) -> Callable[[Any], Any]:
  """A mask function: True for leaves whose name is one of `names`."""
  names = frozenset(names)

  def mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in names, params)
  return mask


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


def _step_schedule(optim_config, steps_per_epoch: int, warmup: int):
  """Multiplies the rate by `step_factor` at each of `step_epochs` (counted after warmup)."""
  factors: dict[int, float] = {}
  for epoch in optim_config.step_epochs:
    boundary = max(1, int(round(epoch * steps_per_epoch)) - warmup)
    factors[boundary] = factors.get(boundary, 1.0) * optim_config.step_factor
  return optax.piecewise_constant_schedule(optim_config.learning_rate, factors)


def learning_rate_schedule(optim_config, steps_per_epoch: int, num_epochs: int):
  total = max(1, steps_per_epoch * num_epochs)
  warmup = int(round(optim_config.warmup_epochs * steps_per_epoch))
  lr = optim_config.learning_rate
  if optim_config.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif optim_config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
  elif optim_config.schedule == "step":
    main = _step_schedule(optim_config, steps_per_epoch, warmup)
  else:
    raise ValueError(f"Unknown optim.schedule '{optim_config.schedule}'; use "
                     "'constant', 'cosine' or 'step'.")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], boundaries=[warmup])


def frozen_steps(config, steps_per_epoch: int) -> int:
  """How many steps the backbone stays frozen: 0 (never frozen) up to the whole run."""
  if config.optim.freeze != "backbone":
    return 0
  if config.train.unfreeze_after_epochs == 0:
    return _NEVER
  return config.train.unfreeze_after_epochs * steps_per_epoch


def _update_rule(optim_config, schedule) -> optax.GradientTransformation:
  """SGD or AdamW with the configured penalties, for one parameter group."""
  mask = leaf_mask(optim_config.decay_leaves)
  parts = []
  if optim_config.l1 > 0:
    parts.append(optax.masked(add_l1_subgradient(optim_config.l1), mask))
  if optim_config.name == "adamw":
    parts.append(optax.adamw(schedule, b1=optim_config.beta1, b2=optim_config.beta2,
                             eps=optim_config.eps, weight_decay=optim_config.weight_decay,
                             mask=mask))
    return optax.chain(*parts)
  if optim_config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim_config.weight_decay, mask=mask))
  parts.append(optax.sgd(schedule, momentum=optim_config.momentum or None,
                         nesterov=optim_config.nesterov))
  return optax.chain(*parts)


def state_layout(optim_config) -> dict[str, bool]:
  """The settings that decide the optimizer state's structure (not just its values).

  A checkpoint's optimizer state restores only into the same structure, so a resumed
  run may not change these.
  """
  adamw = optim_config.name == "adamw"
  return {"optim.name": optim_config.name,
          "optim.momentum": not adamw and optim_config.momentum > 0,
          "optim.weight_decay": not adamw and optim_config.weight_decay > 0,
          "optim.l1": optim_config.l1 > 0,
          "optim.grad_clip_norm": optim_config.grad_clip_norm > 0,
          "optim.freeze": optim_config.freeze != "none",
          "optim.backbone_lr_mult": optim_config.backbone_lr_mult != 1.0,
          # Not the optimizer's, but the train state's: the average is saved beside it.
          "optim.ema_decay": optim_config.ema_decay > 0}


def _group_labels(params: Any) -> dict:
  return {name: "head" if name == "head" else "backbone" for name in params}


def create_optimizer(optim_config, steps_per_epoch: int, num_epochs: int,
                     frozen_for: int | None = None) -> optax.GradientTransformation:
  """The optax chain for `optim_config`.

  `frozen_for` (see `frozen_steps`) is the number of steps a backbone frozen by
  `optim.freeze="backbone"` stays frozen (None: the whole run); afterwards it trains at
  `optim.backbone_lr_mult` times the scheduled rate.
  """
  schedule = learning_rate_schedule(optim_config, steps_per_epoch, num_epochs)
  mult = optim_config.backbone_lr_mult
  if optim_config.freeze == "none" and mult == 1.0:
    tx = _update_rule(optim_config, schedule)
  else:
    start = 0
    if optim_config.freeze == "backbone":
      start = _NEVER if frozen_for is None else frozen_for
    # The masked chain counts only the steps it ran; shift it onto the run's clock.
    backbone = _update_rule(optim_config, lambda count: mult * schedule(count + start))
    if optim_config.freeze == "backbone":
      backbone = optax.conditionally_mask(backbone, lambda step: step >= start)
    head = _update_rule(optim_config, schedule)
    tx = optax.partition({"backbone": backbone, "head": head},
                         _group_labels)
  if optim_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), tx)
  return tx
