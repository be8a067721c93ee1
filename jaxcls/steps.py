"""The pure pieces of training: the train state, the loss, one train step, one eval step.

`train_step` and `eval_step` are written for one device and pmapped over
`parallel.AXIS`: gradients are averaged with `lax.pmean`, batch-norm statistics are
computed over the whole global batch, and evaluation sums are added with `lax.psum`
before one division on the host, so metrics are exact whatever the device count.
Training, evaluation, predict, export, the report and the benchmarks all use these.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax import lax

from jaxcls import cpu, optim
from jaxcls.data import augment
from jaxcls.parallel import AXIS


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def root_key(seed: int) -> jax.Array:
  """The run's one source of randomness.

  The "rbg" generator: on CPU, XLA compiles threefry-based init and dropout several
  times slower (10.5 s against 2.6 s of CPU to compile the catdog CNN's init). It is
  deterministic for a given seed, device count and JAX version.
  """
  return jax.random.key(seed, impl="rbg")


def apply_model(model):
  """The function every step calls to run `model`: its `apply`, with jaxcls's CPU
  layers when traced for the CPU backend (`jaxcls.cpu`; without that package, this
  would return `model.apply`)."""
  return cpu.accelerate(model.apply)


def create_train_state(config: ml_collections.ConfigDict, model, rng: jax.Array,
                       steps_per_epoch: int) -> TrainState:
  """Initializes parameters (on the host's default device) and the optimizer."""
  size = config.data.image_size
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init({"params": rng}, jnp.zeros((1, size, size, 3), jnp.uint8))
  tx = optim.create_optimizer(config.optim, steps_per_epoch, config.num_epochs,
                              optim.frozen_steps(config, steps_per_epoch))
  return TrainState.create(apply_fn=apply_model(model), params=variables["params"],
                           tx=tx, batch_stats=variables.get("batch_stats", {}))


def loss_fn(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy (float32) against labels smoothed by `label_smoothing`."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def step_options(config: ml_collections.ConfigDict) -> dict:
  """The static keyword arguments of `train_step` that come from the config."""
  return {"flip": config.augment.flip, "rotation": config.augment.rotation,
          "scale": tuple(config.augment.scale),
          "label_smoothing": config.train.label_smoothing}


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, flip: bool,
               rotation: float, scale: tuple[float, float], label_smoothing: float = 0.0,
               freeze_backbone: bool = False) -> tuple[TrainState, dict]:
  """One SGD step on this device's share of the batch; call it under pmap.

  Each step and device gets its own random draws: the key is folded with the step and
  the device's index. `freeze_backbone` stops gradients at the backbone, so
  backpropagation skips it (the optimizer keeps a frozen backbone's update at exactly
  zero either way).
  """
  rng = jax.random.fold_in(rng, state.step)
  rng = jax.random.fold_in(rng, lax.axis_index(AXIS))
  augment_rng, dropout_rng = jax.random.split(rng)
  images = augment.augment(augment_rng, batch["image"], flip=flip, rotation=rotation,
                           scale=scale)
  labels = batch["label"]

  def objective(params):
    if freeze_backbone:
      params = {**params, "backbone": lax.stop_gradient(params["backbone"])}
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    return loss_fn(logits, labels, label_smoothing), (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params)
  grads = lax.pmean(grads, AXIS)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, lax.pmean({"loss": loss, "accuracy": accuracy}, AXIS)


def eval_outputs(apply_fn, variables: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Per-example logits [B, C] and losses [B] in evaluation mode.

  The one evaluation computation: `eval_step` sums it over devices for the metrics,
  and the report keeps it per example for its figures.
  """
  logits = apply_fn(variables, batch["image"], train=False)
  return logits, optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])


def eval_step(state: TrainState, batch: dict) -> dict:
  """Sums of loss, correct predictions and real (unmasked) examples over all devices."""
  logits, losses = eval_outputs(
      state.apply_fn, {"params": state.params, "batch_stats": state.batch_stats}, batch)
  mask = batch["mask"]
  correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
  sums = {"loss": jnp.sum(jnp.where(mask, losses, 0.0)),
          "correct": jnp.sum(correct.astype(jnp.int32)),
          "count": jnp.sum(mask.astype(jnp.int32))}
  return lax.psum(sums, AXIS)


def forward_flops_per_image(model, variables: Any, image_size: int) -> float | None:
  """XLA's cost analysis of the compiled inference forward pass on one image.

  A multiply-add counts as two FLOPs (ResNet-50 at 224 px: about 8.0e9). `variables`
  may be abstract (`jax.ShapeDtypeStruct`s): nothing runs. Plain `model.apply`, so every
  convolution is XLA's and counted. None if the backend gives no estimate.
  """
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  forward = jax.jit(functools.partial(model.apply, train=False))
  return compiled_flops(forward.lower(variables, images).compile())


def compiled_flops(stage) -> float | None:
  """XLA's FLOP count of a lowered or compiled program, or None."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None
