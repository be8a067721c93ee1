"""The pure pieces of training: the train state, the loss, one train step, one eval step.

`train_step` and `eval_step` are written for one device and pmapped over
`parallel.AXIS`: gradients are averaged with `lax.pmean`, batch-norm statistics are
computed over the whole global batch, and evaluation sums are added with `lax.psum`
before one division on the host, so metrics are exact whatever the device count.
Training, evaluation, predict, the report and the benchmarks all use these. (Export
traces plain `model.apply` instead, so an exported file holds no CPU kernel.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax import lax

from jaxcls import cpu, optim
from jaxcls.data import augment as augmentation
from jaxcls.parallel import AXIS


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # {"params", "batch_stats"}: an exponential moving average of the weights, evaluated
  # and checkpointed beside them when optim.ema_decay > 0; None otherwise.
  ema: Any = None


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
  batch_stats = variables.get("batch_stats", {})
  ema = ({"params": variables["params"], "batch_stats": batch_stats}
         if config.optim.ema_decay > 0 else None)
  return TrainState.create(apply_fn=apply_model(model), params=variables["params"],
                           tx=tx, batch_stats=batch_stats, ema=ema)


def example_weights(targets: jax.Array, class_weights: tuple[float, ...]) -> jax.Array:
  """Each example's weight [B]: its label's class weight, or for soft targets [B, C]
  (mixup, cutmix) the targets' mix of the class weights. Read from the targets before
  label smoothing, which changes what an example is trained towards, not its weight."""
  weights = jnp.asarray(class_weights, jnp.float32)
  return weights[targets] if targets.ndim == 1 else targets @ weights


def loss_fn(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0,
            class_weights: tuple[float, ...] = (),
            mean_weight: jax.Array | None = None) -> jax.Array:
  """Cross-entropy (float32) against integer labels [B] or soft targets [B, C].

  `label_smoothing` smooths the targets; `class_weights` (one per class) weight each
  example by its class (`example_weights`), the mean taken over the weights. With
  `mean_weight`, the mean weight of a larger batch these examples are a share of, the
  result is that share of the larger batch's weighted mean: mean(w · loss) / mean_weight,
  so that averaging the shares (over devices, micro-batches) gives the whole batch's.
  """
  if targets.ndim == 1 and not label_smoothing and not class_weights:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  weights = example_weights(targets, class_weights) if class_weights else None
  if targets.ndim == 1:
    targets = jax.nn.one_hot(targets, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  losses = optax.softmax_cross_entropy(logits, targets)
  if weights is None:
    return losses.mean()
  if mean_weight is None:
    return jnp.sum(weights * losses) / jnp.sum(weights)
  return jnp.mean(weights * losses) / mean_weight


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The static settings of `train_step` (part of the compiled program)."""
  augment: augmentation.Options = augmentation.Options()
  mix: augmentation.MixOptions = augmentation.MixOptions()
  label_smoothing: float = 0.0
  class_weights: tuple[float, ...] = ()  # One per class; () weights all alike.
  accumulate: int = 1  # Micro-batches per update (gradient accumulation).
  ema_decay: float = 0.0
  freeze_backbone: bool = False
  image_size: int = 0  # Resize the batch's images to this on the device; 0 = as given.


def step_options(config: ml_collections.ConfigDict,
                 class_weights: tuple[float, ...] = ()) -> StepOptions:
  """`train_step`'s settings for `config` (class weights come from the data)."""
  return StepOptions(
      augment=augmentation.Options.from_config(config.augment),
      mix=augmentation.MixOptions(config.augment.mixup_alpha, config.augment.cutmix_alpha),
      label_smoothing=config.train.label_smoothing, class_weights=tuple(class_weights),
      accumulate=config.train.accumulate_steps, ema_decay=config.optim.ema_decay)


def _gradients(state: TrainState, images, targets, dropout_rng, options: StepOptions,
               mean_weight: jax.Array | None = None):
  """(mean loss, logits, new batch statistics, mean gradients) over the micro-batches.

  With `accumulate` = k the batch is cut into k micro-batches that run one after another
  (lax.scan: one micro-batch's activations in memory at a time); their mean gradient is
  the full batch's (class weights included: `mean_weight` is the whole batch's), batch
  norm aside: each micro-batch is normalized by its own statistics. The running
  statistics are updated once per step, from the state's, with the mean of the
  micro-batches' statistics: m·running + (1 − m)·mean_j(stat_j) for momentum m.
  """
  def objective(params, images, targets, key):
    if options.freeze_backbone:
      params = {**params, "backbone": lax.stop_gradient(params["backbone"])}
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        rngs={"dropout": key}, mutable=["batch_stats"])
    loss = loss_fn(logits, targets, options.label_smoothing, options.class_weights,
                   mean_weight)
    return loss, (logits, updates["batch_stats"])

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  k = options.accumulate
  if k == 1:
    (loss, (logits, stats)), grads = grad_fn(state.params, images, targets, dropout_rng)
    return loss, logits, stats, grads
  micro = lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:])

  def one(sums, inputs):
    (loss, (logits, stats)), grads = grad_fn(state.params, *inputs)
    # Each micro-batch's update starts from the state's statistics, so the mean of the
    # updates is one update with the mean of the micro-batches' statistics. Summed as
    # changes: statistics no micro-batch changes (frozen batch norm) stay exact.
    change = jax.tree.map(jnp.subtract, stats, state.batch_stats)
    return jax.tree.map(jnp.add, sums, (grads, change, loss)), logits

  zeros = jax.tree.map(jnp.zeros_like, (state.params, state.batch_stats,
                                        jnp.zeros((), jnp.float32)))
  (grads, change, loss), logits = lax.scan(
      one, zeros, (micro(images), micro(targets), jax.random.split(dropout_rng, k)))
  stats = jax.tree.map(lambda old, total: old + total / k, state.batch_stats, change)
  return (loss / k, logits.reshape((-1,) + logits.shape[2:]), stats,
          jax.tree.map(lambda g: g / k, grads))


def train_step(state: TrainState, batch: dict, rng: jax.Array,
               options: StepOptions = StepOptions()) -> tuple[TrainState, dict]:
  """One optimizer step on this device's share of the batch; call it under pmap.

  Each step and device gets its own random draws: the key is folded with the step and
  the device's index. Augmentation and mixing act on the whole local batch, before it
  is cut into micro-batches. `freeze_backbone` stops gradients at the backbone, so
  backpropagation skips it (the optimizer keeps a frozen backbone's update at exactly
  zero either way).
  """
  rng = jax.random.fold_in(rng, state.step)
  rng = jax.random.fold_in(rng, lax.axis_index(AXIS))
  augment_rng, mix_rng, dropout_rng = jax.random.split(rng, 3)
  images = batch["image"]
  if options.image_size and options.image_size != images.shape[1]:
    images = augmentation.resize(images, options.image_size)  # Progressive resizing.
  images = augmentation.augment(augment_rng, images, options.augment)
  labels = batch["label"]
  targets = labels
  if options.mix.active:
    num_classes = state.params["head"]["bias"].shape[-1]
    images, targets = augmentation.mix(mix_rng, images, labels, num_classes,
                                       options.mix)
  # Class weights: the whole batch's mean weight (every device holds as many images),
  # so the devices' mean gradient is the whole batch's, whatever each device's weights.
  mean_weight = None
  if options.class_weights:
    mean_weight = lax.pmean(jnp.mean(example_weights(targets, options.class_weights)),
                            AXIS)
  loss, logits, batch_stats, grads = _gradients(state, images, targets, dropout_rng,
                                                options, mean_weight)
  grads = lax.pmean(grads, AXIS)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if options.ema_decay > 0:
    # Warmed up: early on the average follows the weights closely, so that a short run
    # still gets a useful average ((1 + t) / (10 + t) until it reaches ema_decay).
    step = state.step.astype(jnp.float32)
    decay = jnp.minimum(options.ema_decay, (1.0 + step) / (10.0 + step))
    state = state.replace(ema=jax.tree.map(
        lambda average, new: decay * average + (1.0 - decay) * new, state.ema,
        {"params": state.params, "batch_stats": state.batch_stats}))
  # With mixing, an image counts as right when the model names its larger share.
  truth = labels if targets.ndim == 1 else jnp.argmax(targets, -1)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == truth)
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
  """XLA's cost analysis of the inference forward pass on one image, compiled for the
  host's CPU.

  A multiply-add counts as two FLOPs (ResNet-50 at 224 px: about 8.0e9). `variables`
  may be abstract (`jax.ShapeDtypeStruct`s): nothing runs. Plain `model.apply`, so every
  convolution is XLA's and counted. Compiled for the CPU, never for an accelerator: a
  batch-1 program there would autotune convolutions the run never uses (cuDNN: tens of
  seconds cold). Without a CPU backend (JAX_PLATFORMS=cuda) the count comes from the
  lowered, unoptimised program: within 1 % of the compiled count in float32, 5 % in
  bfloat16 (ResNet-18/50, ConvNeXt-T). None if XLA gives no estimate.
  """
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  forward = jax.jit(functools.partial(model.apply, train=False))
  host = _host_cpu()
  if host is None:
    return compiled_flops(forward.lower(variables, images))
  sharding = jax.sharding.SingleDeviceSharding(host)
  on_host = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return compiled_flops(forward.lower(*jax.tree.map(on_host, (variables, images)))
                        .compile())


def _host_cpu() -> jax.Device | None:
  """This process's first CPU device, or None when JAX_PLATFORMS leaves the CPU out."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return None


def compiled_flops(stage) -> float | None:
  """XLA's FLOP count of a lowered or compiled program, or None."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None
