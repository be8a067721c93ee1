"""Training and evaluation: pure, pmapped steps and the loop that drives them.

`train_step` and `eval_step` are written for one device and pmapped over
`axis_name="batch"`: gradients are averaged with `lax.pmean`, batch-norm statistics are
computed over the whole global batch, and evaluation sums are added with `lax.psum`
before one division on the host, so metrics are exact whatever the device count.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import signal
import tempfile
import threading
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
from jaxcls import transfer
from jaxcls.data import augment, loader, sources
from jaxcls.models import create_model, flops_per_image

AXIS = "batch"
# Changing these between runs on one workdir changes the model's structure or inputs.
STRUCTURE_KEYS = ("model.name", "model.widths", "model.input_mean", "model.input_std",
                  "model.head_hidden", "data.image_size")
# Changing these on resume is harmless: no warning. Any other change warns.
QUIET_KEYS = ("data.workers", "train.progress_bar", "train.log_every_steps",
              "checkpoint.keep", "checkpoint.every_steps", "checkpoint.async_save")
# OSError numbers that mean "the workdir cannot take more writes".
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

log = logging.getLogger("jaxcls")


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


class TrainingDivergedError(RuntimeError):
  """The loss or the parameters became NaN or infinite; nothing after that was saved."""


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
  tx = optim.create_optimizer(config.optim, steps_per_epoch, config.num_epochs,
                              optim.frozen_steps(config, steps_per_epoch))
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}))


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, flip: bool,
               rotation: float, scale: tuple[float, float], label_smoothing: float = 0.0,
               freeze_backbone: bool = False) -> tuple[TrainState, dict]:
  """One SGD step on this device's share of the batch; call it under pmap.

  `freeze_backbone` stops gradients at the backbone, so backpropagation skips it (the
  optimizer keeps a frozen backbone's update at exactly zero either way).
  """
  rng = jax.random.fold_in(rng, state.step)
  rng = jax.random.fold_in(rng, lax.axis_index(AXIS))
  augment_rng, dropout_rng = jax.random.split(rng)
  images = augment.augment(augment_rng, batch["image"], flip=flip, rotation=rotation,
                           scale=scale)
  labels = batch["label"]

  def loss_fn(params):
    if freeze_backbone:
      params = {**params, "backbone": lax.stop_gradient(params["backbone"])}
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    loss = _loss(logits, labels, label_smoothing)
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = lax.pmean(grads, AXIS)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, lax.pmean({"loss": loss, "accuracy": accuracy}, AXIS)


def _loss(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float) -> jnp.ndarray:
  """Mean cross-entropy (float32) against labels smoothed by `label_smoothing`."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


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
  return sources.worker_count(config.data.workers)


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


def _value(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def _check_resume_compatible(saved_config: dict, config, saved_classes,
                             classes) -> list[str]:
  """Errors on changes to the model or its inputs; warns about any other changed key.

  Returns the keys it warned about.
  """
  saved = config_lib.from_dict(saved_config)
  for key in STRUCTURE_KEYS:
    old, new = _value(saved, key), _value(config, key)
    if tuple(np.atleast_1d(old)) != tuple(np.atleast_1d(new)):
      raise config_lib.ConfigError(
          f"The workdir holds a run with {key}={old!r}, but the config now says {new!r}. "
          "Use a new --workdir, or set the key back to resume.")
  if tuple(saved_classes) != tuple(classes):
    raise config_lib.ConfigError(
        f"The workdir holds a run trained on classes {list(saved_classes)}, but the data "
        f"now has {list(classes)}. Use a new --workdir for a different data set.")
  old_layout, new_layout = optim.state_layout(saved.optim), optim.state_layout(config.optim)
  moved = [k for k in old_layout if old_layout[k] != new_layout[k]]
  if moved:
    values = ", ".join(f"{k} {_value(saved, k)!r} → {_value(config, k)!r}" for k in moved)
    raise config_lib.ConfigError(
        f"The optimizer state in the workdir does not fit the new config ({values}): "
        "turning momentum, weight decay, L1, clipping, freezing or a backbone rate on or "
        "off changes its structure. Set the key back to resume, or use a new --workdir "
        "(with --config.init_from=OLD_WORKDIR to start from its weights).")
  old, new = config_lib.flatten(saved), config_lib.flatten(config)
  changed = [k for k in sorted(new) if k not in QUIET_KEYS and old.get(k) != new[k]]
  for key in changed:
    log.warning("Resuming with %s=%r; the checkpoint was trained with %r. Continuing "
                "with the new value.", key, new[key], old.get(key))
  return changed


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


@jax.jit
def _all_finite(tree) -> jax.Array:
  """True when every float in `tree` is finite: one scalar, so one tiny transfer."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _latest_complete_step(workdir: str) -> int | None:
  """The newest checkpoint on disk that was fully written (temporary folders ignored)."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return None
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def _diverged(what: str, step: int, workdir: str, config) -> TrainingDivergedError:
  good = _latest_complete_step(workdir)
  kept = ("no checkpoint had been saved yet" if good is None else
          f"the last good checkpoint, step {good} in {checkpoint.checkpoint_dir(workdir)}, "
          "is kept and a rerun resumes from it")
  return TrainingDivergedError(
      f"Training stopped: {what} at step {step}. Nothing was saved after it; {kept}. "
      f"Lower optim.learning_rate (now {config.optim.learning_rate}) or check the data.")


def _check_losses(rows: list[dict], done: int, workdir: str, config) -> None:
  """Raises if any loss in `rows` (the steps ending at `done`) is NaN or infinite."""
  for offset, row in enumerate(rows):
    if not np.isfinite(row["loss"]):
      step = done - len(rows) + offset + 1
      raise _diverged(f"the loss was {row['loss']}", step, workdir, config)


def _write_error_cause(error: BaseException, workdir: str) -> OSError | None:
  """The OSError behind `error` that says the workdir is full or not writable, if any.

  Orbax's background writes fail with TensorStore errors (a ValueError whose text ends
  in "[os_error_code='28']"); those are turned back into the OSError they describe. An
  OSError about a file outside the workdir (say, an unreadable input) is not one.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
      where = error.filename
      inside = where is None or os.path.abspath(os.fspath(where)).startswith(workdir)
      return error if inside else None
    code = re.search(r"os_error_code='(\d+)'", str(error))
    if code and int(code.group(1)) in WRITE_ERRNOS:
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    error = error.__cause__ or error.__context__
  return None


def _write_error(cause: OSError, workdir: str) -> WorkdirError:
  try:
    latest = _latest_complete_step(workdir)
  except Exception:  # An unreadable folder must not hide the original error.
    latest = None
  kept = ("There were no checkpoints yet." if latest is None else
          f"The checkpoints already there are intact (latest complete: step {latest}).")
  where = f" ({cause.filename})" if cause.filename else ""
  return WorkdirError(
      f"Cannot write to the workdir '{workdir}': {cause.strerror or cause}{where}. "
      f"{kept} Free some space or fix the permissions, then rerun the same command to "
      "resume.")


class _StopSignals:
  """SIGTERM or Ctrl-C ask the loop to save at the current step and stop cleanly.

  The previous handlers come back as soon as one signal arrives, so a second Ctrl-C
  still interrupts a run that seems stuck. Only the main thread may install handlers;
  elsewhere this does nothing.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self) -> "_StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signal.Signals(signum).name
    log.warning("Received %s: saving a checkpoint after this step, then stopping.",
                self.received)
    self._restore()

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __exit__(self, *exc) -> None:
    self._restore()


def _new_progress() -> dict:
  """What a checkpoint records about the run beyond the state: best epoch, epoch sums."""
  return {"best": None, "epoch_sums": {"loss": 0.0, "accuracy": 0.0, "steps": 0}}


def _patience_ran_out(progress: dict, config, epoch: int) -> bool:
  patience = config.train.early_stopping_patience
  best = progress["best"]
  return bool(patience) and best is not None and epoch - best["epoch"] >= patience


def _pmap_train_step(config, devices, *, freeze_backbone: bool):
  return jax.pmap(
      functools.partial(train_step, flip=config.augment.flip,
                        rotation=config.augment.rotation,
                        scale=tuple(config.augment.scale),
                        label_smoothing=config.train.label_smoothing,
                        freeze_backbone=freeze_backbone),
      axis_name=AXIS, devices=distributed.pmap_devices(devices), in_axes=(0, 0, None),
      donate_argnums=(0,))


def _log_model(config, state: TrainState, num_classes: int, num_devices: int,
               num_steps: int) -> None:
  """Logs the parameter count and XLA's FLOPs per image of the inference forward pass."""
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  variables = jax.eval_shape(lambda: {"params": state.params,
                                      "batch_stats": state.batch_stats})
  flops = flops_per_image(create_model(config.model, num_classes), variables,
                          config.data.image_size)
  flops_text = "unknown" if flops is None else f"{flops / 1e9:.3f} GFLOPs"
  log.info("Model %s: %s parameters, %s per %d px image (XLA, multiply-add = 2); "
           "%d devices; %d steps of %d images.", config.model.name, f"{num_params:,}",
           flops_text, config.data.image_size, num_devices, num_steps, config.batch_size)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None) -> tuple[TrainState, dict]:
  """Trains with validation after every epoch; resumes from the workdir's checkpoint.

  Returns the final (unreplicated) train state and a dict of the last metrics:
  `train_loss`, `train_accuracy`, `val_loss`, `val_accuracy`, `epoch`, `step`, plus
  `final_step` and `stop_reason`: "finished", "early_stopping", or the signal's name
  ("SIGTERM", "SIGINT") when a signal stopped the run after saving a checkpoint (run
  the same command again to resume).

  Raises TrainingDivergedError on a NaN or infinite loss (the last good checkpoint is
  kept) and WorkdirError when the workdir cannot be written (the checkpoints already
  there are intact).
  """
  try:
    return _train_and_evaluate(config, workdir, devices)
  except Exception as e:
    absolute = os.path.abspath(os.path.expanduser(workdir))
    cause = _write_error_cause(e, absolute)
    if cause is None or isinstance(e, WorkdirError):
      raise
    raise _write_error(cause, absolute) from e


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        devices) -> tuple[TrainState, dict]:
  config_lib.validate(config)
  devices = list(devices or jax.local_devices())
  _check_devices(config, devices)
  workdir = _prepare_workdir(workdir)
  is_main = jax.process_index() == 0

  # Process 0 first: it draws generated data and writes the caches the others then read.
  dataset = distributed.on_main_process_first(lambda: sources.build_dataset(
      config.data, config.seed, workdir, _workers(config)))
  distributed.check_same_everywhere(
      lambda: _dataset_fingerprint(dataset), "The processes see different data sets (their "
      "file lists differ). Give every host the same data.source, e.g. on a shared "
      "file system.")
  steps_per_epoch = len(dataset.train) // config.batch_size
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(
        f"batch_size={config.batch_size} is larger than the {len(dataset.train)} "
        "training images; lower --config.batch_size.")
  num_steps = steps_per_epoch * config.num_epochs
  log.info("Classes %s; %d training and %d validation images; %d skipped.",
           list(dataset.class_names), len(dataset.train), len(dataset.val),
           len(dataset.skipped))

  mngr = checkpoint.manager(workdir, config.checkpoint.keep,
                            async_save=config.checkpoint.async_save)
  meta = checkpoint.restore_meta(mngr) if mngr.latest_step() is not None else None
  source = None
  if config.init_from and meta is not None:
    # Resuming: the run's own checkpoint holds the backbone; init_from is not read again.
    config = transfer.adopt_source_model(
        config, config_lib.from_dict(meta["config"]), config.init_from)
  elif config.init_from:
    source = transfer.load_source(config.init_from)
    config = transfer.adopt_source_model(config, source.config, source.workdir)
  model = create_model(config.model, len(dataset.class_names), axis_name=AXIS,
                       backbone_bn_train=config.optim.freeze != "backbone")
  init_rng, train_rng = jax.random.split(root_key(config.seed))
  state = create_train_state(config, model, init_rng, steps_per_epoch)
  _log_model(config, state, len(dataset.class_names), len(devices) * jax.process_count(),
             num_steps)

  last, progress = {}, _new_progress()
  if meta is not None:
    _check_resume_compatible(meta["config"], config, meta["class_names"],
                             dataset.class_names)
    state = checkpoint.restore_state(mngr, mngr.latest_step(), state)
    last = meta.get("metrics", {})
    progress.update(meta.get("progress", {}))
    log.info("Resumed from step %d (epoch %s).", int(state.step), meta.get("epoch"))
  elif source:
    state = transfer.transplant_backbone(state, source)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))
  start_step = int(state.step)
  if start_step >= num_steps or (start_step % steps_per_epoch == 0 and _patience_ran_out(
      progress, config, start_step // steps_per_epoch)):
    reason = "finished" if start_step >= num_steps else "early_stopping"
    log.info("Training already %s at step %d; nothing to do.",
             "finished" if reason == "finished" else "stopped early", start_step)
    mngr.close()
    return state, {**last, "final_step": start_step, "stop_reason": reason}

  p_train_step = _pmap_train_step(config, devices, freeze_backbone=False)
  # Compiled on first use: the frozen phase backpropagates through the head only.
  p_frozen_step = _pmap_train_step(config, devices, freeze_backbone=True)
  frozen_for = optim.frozen_steps(config, steps_per_epoch)
  p_eval_step = jax.pmap(eval_step, axis_name=AXIS,
                         devices=distributed.pmap_devices(devices))
  schedule = optim.learning_rate_schedule(config.optim, steps_per_epoch, config.num_epochs)

  batches = loader.prefetch_to_devices(loader.train_batches(
      dataset.train, batch_size=config.batch_size, image_size=config.data.image_size,
      seed=config.seed, num_steps=num_steps, start_step=start_step,
      workers=_workers(config), process_index=jax.process_index(),
      process_count=jax.process_count()), devices)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, purge_after=start_step)
  if is_main and start_step == 0 and config.train.log_images:
    _log_augmented_images(writer, dataset.train, config, train_rng,
                          config.train.log_images)
  replicated = replicate(state, devices)
  bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
             disable=not (config.train.progress_bar and is_main))
  sums = progress["epoch_sums"]  # Train loss/accuracy of the epoch so far (resumable).
  every = config.checkpoint.every_steps
  pending, stop_reason, done = [], "finished", start_step
  tick, tick_step = time.perf_counter(), start_step
  try:
    with _StopSignals() as signals:
      for step in range(start_step, num_steps):
        if step == frozen_for and step > 0:
          log.info("Step %d: unfreezing the backbone (learning rate x %g).", step,
                   config.optim.backbone_lr_mult)
        step_fn = p_frozen_step if step < frozen_for else p_train_step
        replicated, step_metrics = step_fn(replicated, next(batches), train_rng)
        pending.append(step_metrics)
        bar.update(1)
        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0
        periodic = bool(every) and done % every == 0
        sync_point = not (done % config.train.log_every_steps) or end_of_epoch or periodic
        # Several processes must save and stop at the same step: they agree on signals
        # at log intervals (one signal to any host stops them all there).
        received = distributed.signal_anywhere(signals.received, sync_point)
        if not sync_point and not received:
          continue
        # One device→host transfer per log interval or save, not per step.
        rows = [{k: float(v[0]) for k, v in m.items()} for m in jax.device_get(pending)]
        pending = []
        _check_losses(rows, done, workdir, config)
        for row in rows:
          sums["loss"] += row["loss"]
          sums["accuracy"] += row["accuracy"]
          sums["steps"] += 1
        now = time.perf_counter()
        speed = (done - tick_step) * config.batch_size / (now - tick)
        tick, tick_step = now, done
        interval = _summaries(rows)
        epoch = (done - 1) // steps_per_epoch + 1
        writer.write(done, "train", {**interval, "learning_rate": float(schedule(done - 1)),
                                     "images_per_sec": speed}, epoch=epoch)
        bar.set_postfix(loss=f"{interval['loss']:.4f}", img_s=f"{speed:.0f}")
        val = None
        if end_of_epoch:
          val = _evaluate(p_eval_step, replicated, dataset.val, config, devices)
          writer.write(done, "val", val, epoch=epoch)
          writer.flush()
          last = {"epoch": epoch, "step": done,
                  "train_loss": sums["loss"] / sums["steps"],
                  "train_accuracy": sums["accuracy"] / sums["steps"],
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
          progress["epoch_sums"] = sums = _new_progress()["epoch_sums"]
          best = progress["best"]
          if best is None or val["accuracy"] > best["val_accuracy"]:
            progress["best"] = {"val_accuracy": val["accuracy"], "epoch": epoch,
                                "step": done}
          if is_main:
            bar.write(f"epoch {epoch}/{config.num_epochs}  step {done}  "
                      f"train loss {last['train_loss']:.4f} "
                      f"acc {last['train_accuracy']:.4f}  "
                      f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}")
        if end_of_epoch or periodic or received:
          state = unreplicate(replicated)
          if not bool(_all_finite((state.params, state.batch_stats))):
            raise _diverged("the parameters became NaN or infinite", done, workdir, config)
          checkpoint.save(mngr, done, state, {
              "config": config.to_dict(), "class_names": list(dataset.class_names),
              "epoch": done // steps_per_epoch, "step": done, "metrics": last,
              "progress": progress}, val_accuracy=val["accuracy"] if val else None)
        if received:
          stop_reason = received
          break
        if end_of_epoch and _patience_ran_out(progress, config, epoch):
          stop_reason = "early_stopping"
          best = progress["best"]
          log.info("Early stopping after epoch %d: no better validation accuracy since "
                   "epoch %d (%.4f), patience %d.", epoch, best["epoch"],
                   best["val_accuracy"], config.train.early_stopping_patience)
          break
    mngr.wait_until_finished()
  finally:
    bar.close()
    _close_quietly(writer, mngr)
  if stop_reason.startswith("SIG"):
    log.warning("Stopped by %s at step %d; checkpoint %d saved in %s. Run the same "
                "command again to resume.", stop_reason, done, done,
                checkpoint.checkpoint_dir(workdir))
  final = unreplicate(replicated)
  return final, {**last, "final_step": done, "stop_reason": stop_reason}


def _close_quietly(writer, mngr) -> None:
  """Closes after an error without hiding it; on success the errors were seen already."""
  for close in (writer.close, mngr.close):
    try:
      close()
    except Exception as e:  # Already failing (disk full); keep the first error.
      log.debug("Ignoring %r while closing.", e)

