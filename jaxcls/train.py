"""Training and evaluation: pure, pmapped steps and the loop that drives them.

`train_step` and `eval_step` are written for one device and pmapped over
`axis_name="batch"`: gradients are averaged with `lax.pmean`, batch-norm statistics are
computed over the whole global batch, and evaluation sums are added with `lax.psum`
before one division on the host, so metrics are exact whatever the device count.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax import lax
from tqdm.auto import tqdm

from jaxcls import checkpoint
from jaxcls import config as config_lib
from jaxcls import distributed
from jaxcls import metrics as metrics_lib
from jaxcls import optim
from jaxcls.data import augment, loader, sources
from jaxcls.models import create_model

AXIS = "batch"
# Changing these between runs on one workdir changes the model's structure or inputs.
STRUCTURE_KEYS = ("model.name", "model.widths", "model.input_mean", "model.input_std",
                  "data.image_size")

log = logging.getLogger("jaxcls")


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def root_key(seed: int) -> jax.Array:
  """The run's one source of randomness.

  The "rbg" generator: on CPU, XLA compiles threefry-based init and dropout several
  times slower (10.5 s against 2.6 s of CPU to compile the catdog CNN's init). It is
  deterministic for a given seed, device count and JAX version.
  """
  return jax.random.key(seed, impl="rbg")


def replicate(tree: Any, devices) -> Any:
  """One copy of every array per device, stacked on a leading axis, as pmap takes it.

  Stacked on the host: stacking with jnp would compile one small program per shape.
  """
  sharding = loader.device_sharding(devices)
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of each array of a pmapped result, as host arrays.

  Reads the first addressable shard directly: indexing the global array would compile a
  slice per shape, and flax.jax_utils.unreplicate returns [1, ...] arrays when pmap ran
  on one device of several.
  """
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_shards[0].data)[0]
    return np.asarray(x)[0]
  return jax.tree.map(first, tree)


def create_train_state(config: ml_collections.ConfigDict, model, rng: jax.Array,
                       steps_per_epoch: int) -> TrainState:
  """Initializes parameters (on the host's default device) and the optimizer."""
  size = config.data.image_size
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init({"params": rng}, jnp.zeros((1, size, size, 3), jnp.uint8))
  tx = optim.create_optimizer(config.optim, steps_per_epoch, config.num_epochs)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}))


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, flip: bool,
               rotation: float, scale: tuple[float, float]) -> tuple[TrainState, dict]:
  """One SGD step on this device's share of the batch; call it under pmap."""
  rng = jax.random.fold_in(rng, state.step)
  rng = jax.random.fold_in(rng, lax.axis_index(AXIS))
  augment_rng, dropout_rng = jax.random.split(rng)
  images = augment.augment(augment_rng, batch["image"], flip=flip, rotation=rotation,
                           scale=scale)
  labels = batch["label"]

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = lax.pmean(grads, AXIS)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, lax.pmean({"loss": loss, "accuracy": accuracy}, AXIS)


def eval_outputs(apply_fn, variables: dict, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-example logits [B, C] and losses [B] in evaluation mode.

  The one evaluation computation: `eval_step` sums it over devices for the metrics,
  and the report (`jaxcls.report`) keeps it per example for its figures.
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


def _evaluate(p_eval_step, replicated_state, source, config, devices) -> dict:
  batches = loader.eval_batches(
      source, batch_size=config.batch_size, image_size=config.data.image_size,
      workers=_workers(config), process_index=jax.process_index(),
      process_count=jax.process_count())
  totals = None
  for batch in loader.prefetch_to_devices(batches, devices):
    sums = p_eval_step(replicated_state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(jax.tree.map(lambda x: x[0], totals))
  count = int(totals["count"])
  return {"loss": float(totals["loss"]) / count,
          "accuracy": int(totals["correct"]) / count, "count": count}


def evaluate(state: TrainState, source, config: ml_collections.ConfigDict,
             devices=None) -> dict:
  """Loss and accuracy over every example of `source` (exact: padding is masked)."""
  devices = devices or jax.local_devices()
  p_eval_step = jax.pmap(eval_step, axis_name=AXIS,
                         devices=distributed.pmap_devices(devices))
  return _evaluate(p_eval_step, replicate(state, devices), source,
                   config, devices)


def _workers(config) -> int:
  return config.data.workers or os.cpu_count() or 1


def _prepare_workdir(workdir: str) -> str:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as e:
    raise WorkdirError(f"Cannot write to workdir '{workdir}' ({e.strerror or e}). "
                       "Choose a writable --workdir or fix its permissions.") from None
  return workdir


def _check_devices(config, devices) -> None:
  total = len(devices) * jax.process_count()
  if config.batch_size % total:
    lower = config.batch_size // total * total
    raise config_lib.ConfigError(
        f"batch_size={config.batch_size} does not divide by the {total} devices in use. "
        f"Use a multiple of {total}, e.g. --config.batch_size={max(lower, total)} "
        f"or {lower + total}.")


def _dataset_fingerprint(dataset: sources.Dataset) -> bytes:
  return json.dumps([dataset.train.paths, dataset.train.labels, dataset.val.paths,
                     dataset.val.labels, dataset.class_names]).encode()


def _check_resume_compatible(saved_config: dict, config, saved_classes, classes) -> None:
  saved = config_lib.from_dict(saved_config)
  for key in STRUCTURE_KEYS:
    old, new = saved, config
    for part in key.split("."):
      old, new = old[part], new[part]
    if tuple(np.atleast_1d(old)) != tuple(np.atleast_1d(new)):
      raise config_lib.ConfigError(
          f"The workdir holds a run with {key}={old!r}, but the config now says {new!r}. "
          "Use a new --workdir, or set the key back to resume.")
  if tuple(saved_classes) != tuple(classes):
    raise config_lib.ConfigError(
        f"The workdir holds a run trained on classes {list(saved_classes)}, but the data "
        f"now has {list(classes)}. Use a new --workdir for a different data set.")


def _log_augmented_images(writer: metrics_lib.MetricWriter, source, config,
                          rng: jax.Array, count: int) -> None:
  """Puts a grid of `count` augmented training images in TensorBoard (step 0).

  The first images of a training order go through `augment.augment` with the run's
  settings (its own random draw), so a wrong setting shows before hours are spent.
  It runs jitted on the host CPU, leaving the accelerators to training.
  """
  batch = next(loader.train_batches(
      source, batch_size=min(count, len(source)), image_size=config.data.image_size,
      seed=config.seed, num_steps=1, workers=1))
  try:
    device = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU: use the default device.
    device = jax.local_devices()[0]
  apply = jax.jit(functools.partial(
      augment.augment, flip=config.augment.flip, rotation=config.augment.rotation,
      scale=tuple(config.augment.scale)))
  images = apply(jax.device_put(jax.random.fold_in(rng, 0), device),
                 jax.device_put(batch["image"], device))
  writer.write_images(0, "train/augmented_images", np.asarray(images))


def _summaries(rows: list[dict]) -> dict:
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None) -> tuple[TrainState, dict]:
  """Trains with validation after every epoch; resumes from the workdir's checkpoint.

  Returns the final (unreplicated) train state and a dict of the last metrics:
  `train_loss`, `train_accuracy`, `val_loss`, `val_accuracy`, `epoch`, `step`.
  """
  config_lib.validate(config)
  devices = list(devices or jax.local_devices())
  _check_devices(config, devices)
  workdir = _prepare_workdir(workdir)
  is_main = jax.process_index() == 0

  # Process 0 first: it draws generated data and writes the caches the others then read.
  dataset = distributed.on_main_process_first(lambda: sources.build_dataset(
      config.data, config.seed, workdir, _workers(config)))
  distributed.check_same_everywhere(
      _dataset_fingerprint(dataset), "The processes see different data sets (their file "
      "lists differ). Give every host the same data.source, e.g. on a shared file system.")
  steps_per_epoch = len(dataset.train) // config.batch_size
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(
        f"batch_size={config.batch_size} is larger than the {len(dataset.train)} "
        "training images; lower --config.batch_size.")
  num_steps = steps_per_epoch * config.num_epochs
  log.info("Classes %s; %d training and %d validation images; %d skipped.",
           list(dataset.class_names), len(dataset.train), len(dataset.val),
           len(dataset.skipped))

  model = create_model(config.model, len(dataset.class_names), axis_name=AXIS)
  init_rng, train_rng = jax.random.split(root_key(config.seed))
  state = create_train_state(config, model, init_rng, steps_per_epoch)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("Model %s: %s parameters; %d devices; %d steps of %d images.",
           config.model.name, f"{num_params:,}", len(devices) * jax.process_count(),
           num_steps, config.batch_size)

  mngr = checkpoint.manager(workdir, config.checkpoint.keep)
  last = {}
  if mngr.latest_step() is not None:
    meta = checkpoint.restore_meta(mngr)
    _check_resume_compatible(meta["config"], config, meta["class_names"],
                             dataset.class_names)
    state = checkpoint.restore_state(mngr, mngr.latest_step(), state)
    last = meta.get("metrics", {})
    log.info("Resumed from step %d (epoch %s).", int(state.step), meta.get("epoch"))
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))
  start_step = int(state.step)
  if start_step >= num_steps:
    log.info("Training already finished at step %d; nothing to do.", start_step)
    mngr.close()
    return state, last

  p_train_step = jax.pmap(
      functools.partial(train_step, flip=config.augment.flip,
                        rotation=config.augment.rotation,
                        scale=tuple(config.augment.scale)),
      axis_name=AXIS, devices=distributed.pmap_devices(devices), in_axes=(0, 0, None),
      donate_argnums=(0,))
  p_eval_step = jax.pmap(eval_step, axis_name=AXIS,
                         devices=distributed.pmap_devices(devices))
  schedule = optim.learning_rate_schedule(config.optim, steps_per_epoch, config.num_epochs)

  batches = loader.prefetch_to_devices(loader.train_batches(
      dataset.train, batch_size=config.batch_size, image_size=config.data.image_size,
      seed=config.seed, num_steps=num_steps, start_step=start_step,
      workers=_workers(config), process_index=jax.process_index(),
      process_count=jax.process_count()), devices)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  if is_main and start_step == 0 and config.train.log_images:
    _log_augmented_images(writer, dataset.train, config, train_rng,
                          config.train.log_images)
  replicated = replicate(state, devices)
  bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
             disable=not (config.train.progress_bar and is_main))
  pending, epoch_rows = [], []
  tick, tick_step = time.perf_counter(), start_step
  for step in range(start_step, num_steps):
    replicated, step_metrics = p_train_step(replicated, next(batches), train_rng)
    pending.append(step_metrics)
    bar.update(1)
    done = step + 1
    end_of_epoch = done % steps_per_epoch == 0
    if done % config.train.log_every_steps and not end_of_epoch:
      continue
    # One device→host transfer per log interval, not per step.
    rows = [{k: float(v[0]) for k, v in m.items()} for m in jax.device_get(pending)]
    pending = []
    epoch_rows.extend(rows)
    now = time.perf_counter()
    speed = (done - tick_step) * config.batch_size / (now - tick)
    tick, tick_step = now, done
    interval = _summaries(rows)
    epoch = (done - 1) // steps_per_epoch + 1
    writer.write(done, "train", {**interval, "learning_rate": float(schedule(done - 1)),
                                 "images_per_sec": speed}, epoch=epoch)
    bar.set_postfix(loss=f"{interval['loss']:.4f}", img_s=f"{speed:.0f}")
    if not end_of_epoch:
      continue
    train_summary = _summaries(epoch_rows)
    epoch_rows = []
    val = _evaluate(p_eval_step, replicated, dataset.val, config, devices)
    writer.write(done, "val", val, epoch=epoch)
    writer.flush()
    last = {"epoch": epoch, "step": done, "train_loss": train_summary["loss"],
            "train_accuracy": train_summary["accuracy"], "val_loss": val["loss"],
            "val_accuracy": val["accuracy"]}
    if is_main:
      bar.write(f"epoch {epoch}/{config.num_epochs}  step {done}  "
                f"train loss {last['train_loss']:.4f} acc {last['train_accuracy']:.4f}  "
                f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}")
    state = unreplicate(replicated)
    checkpoint.save(mngr, done, state, {
        "config": config.to_dict(), "class_names": list(dataset.class_names),
        "epoch": epoch, "step": done, "metrics": last})
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  return unreplicate(replicated), last
