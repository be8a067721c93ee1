"""`train_and_evaluate`: prepare, step, log, evaluate, checkpoint, stop.

The steps themselves are in `steps.py`; device plumbing in `parallel.py`; what can stop a
run (a full disk, divergence, a signal) in `guards.py`; what a resumed run may change in
`resume.py`; the checkpoint's record in `workdir.py`. This module puts them in order.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxcls import checkpoint, distributed, guards, optim, parallel, resume, steps
from jaxcls import config as config_lib
from jaxcls import metric_writers, tracking, transfer
from jaxcls import workdir as workdir_lib
from jaxcls.data import augment, cache, loader, sources
from jaxcls.models import create_model
from jaxcls.workdir import Best, EpochMetrics, EpochSums, Progress, RunMeta

log = logging.getLogger("jaxcls")

# Re-exported: what callers of train_and_evaluate catch.
WorkdirError = guards.WorkdirError
TrainingDivergedError = guards.TrainingDivergedError


@dataclasses.dataclass
class RunSummary:
  """How a call of `train_and_evaluate` ended.

  `stop_reason` is "finished", "early_stopping", the signal's name ("SIGTERM",
  "SIGINT": a checkpoint of `final_step` was saved; run again to resume), or, when the
  workdir's run had already ended and nothing was trained, "already_finished" or
  "already_stopped_early". `changed_keys` are the config keys whose value differs from
  the checkpoint this call resumed from (empty for a fresh run).
  """
  final_step: int
  stop_reason: str
  last_epoch: EpochMetrics | None = None
  resumed_from: int | None = None
  changed_keys: tuple[str, ...] = ()

  @property
  def trained(self) -> bool:
    return not self.stop_reason.startswith("already_")

  def as_dict(self) -> dict:
    return {**(dataclasses.asdict(self.last_epoch) if self.last_epoch else {}),
            "final_step": self.final_step, "stop_reason": self.stop_reason,
            "resumed_from": self.resumed_from, "changed_keys": list(self.changed_keys)}


@dataclasses.dataclass
class _Run:
  """Everything `_prepare` sets up for the loop."""
  config: ml_collections.ConfigDict
  workdir: str
  devices: list
  dataset: sources.Dataset
  steps_per_epoch: int
  num_steps: int
  state: steps.TrainState
  progress: Progress
  start_step: int
  mngr: Any
  train_rng: jax.Array
  resumed_from: int | None = None
  changed_keys: tuple[str, ...] = ()
  callbacks: tuple = ()
  class_weights: tuple[float, ...] = ()
  # time.perf_counter() when the run's clock read 0: this call's start less the time
  # earlier sessions spent (Progress.elapsed_seconds), so resumed runs count on.
  time_origin: float = 0.0

  def elapsed(self) -> float:
    """Wall seconds the run has spent, over every session that resumed it."""
    return time.perf_counter() - self.time_origin

  @property
  def is_main(self) -> bool:
    return distributed.is_main_process()

  def summary(self, final_step: int, stop_reason: str) -> RunSummary:
    return RunSummary(final_step, stop_reason, self.progress.last_epoch,
                      self.resumed_from, self.changed_keys)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None, resume: str = "auto", callbacks: Sequence = ()
                       ) -> tuple[steps.TrainState, RunSummary]:
  """Trains with validation after every epoch; returns the final state and a summary.

  `resume`: "auto" continues the workdir's run if it holds one; "never" refuses a
  workdir that holds one; "require" refuses one that does not. A run that had already
  ended trains nothing and says so (`RunSummary.stop_reason`, a warning in the log).
  `callbacks` (see `jaxcls.tracking.Callback`) get every step's metrics, every epoch's
  and the summary, on process 0.

  Raises TrainingDivergedError on a NaN or infinite loss (the last good checkpoint is
  kept), WorkdirError when the workdir cannot be written (the checkpoints already there
  are intact), and ConfigError / DataError for a bad config or data set.
  """
  started = time.perf_counter()
  with guards.named_write_errors(workdir):
    run = _prepare(config, workdir, devices, resume)
    run.time_origin = started - run.progress.elapsed_seconds
    run.callbacks = tuple(callbacks) + tracking.from_config(run.config)
    try:
      done = _already_done(run)
      result = (run.state, done) if done is not None else _train(run)
    except BaseException:
      _close_quietly(run.mngr.close)  # Already failing (disk full?): keep that error.
      raise
    run.mngr.close()
    return result


# ------------------------------------------------------------------------------ prepare


def _prepare(config, workdir: str, devices, resume_mode: str) -> _Run:
  config_lib.validate(config)
  devices = list(devices or jax.local_devices())
  num_devices = len(devices) * jax.process_count()
  parallel.check_batch_divides(config.batch_size, num_devices)
  if config.batch_size // num_devices % config.train.accumulate_steps:
    raise config_lib.ConfigError(
        f"train.accumulate_steps={config.train.accumulate_steps} does not divide each "
        f"device's {config.batch_size // num_devices} images (batch_size="
        f"{config.batch_size} over {num_devices} devices); use a divisor of it, or a "
        "batch_size that is a multiple of devices × accumulate_steps.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  resume.check_mode(resume_mode, workdir,
                    checkpoint.latest_complete_step(workdir) is not None)
  workdir = workdir_lib.prepare(workdir)
  dataset = _load_data(config, workdir)
  steps_per_epoch = len(dataset.train) // config.batch_size
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(
        f"batch_size={config.batch_size} is larger than the {len(dataset.train)} "
        "training images; lower --config.batch_size.")
  mngr = checkpoint.manager(workdir, config.checkpoint.keep,
                            async_save=config.checkpoint.async_save)
  try:
    latest = mngr.latest_step()
    meta = workdir_lib.read_meta(mngr, latest) if latest is not None else None
    run = _build_state(config, workdir, devices, dataset, steps_per_epoch, mngr, meta)
  except BaseException:
    mngr.close()
    raise
  if run.is_main:
    workdir_lib.write_config(workdir, run.config)
  return run


def _load_data(config, workdir: str) -> sources.Dataset:
  # Process 0 first: it draws generated data and writes the caches the others then read.
  dataset = distributed.on_main_process_first(lambda: sources.build_dataset(
      config.data, config.seed, workdir, sources.worker_count(config.data.workers)))
  distributed.check_same_everywhere(
      lambda: dataset.fingerprint(), "The processes see different data sets (their "
      "file lists differ). Give every host the same data.source, e.g. on a shared "
      "file system.")
  if config.data.cache == "none":  # Validation reads every image every epoch: keep them.
    dataset = dataclasses.replace(dataset, val=cache.kept_in_memory_if_fits(
        dataset.val, config.data.image_size))
  log.info("Classes %s; %d training and %d validation images; %d skipped.",
           list(dataset.class_names), len(dataset.train), len(dataset.val),
           len(dataset.skipped))
  return dataset


def _build_state(config, workdir, devices, dataset, steps_per_epoch, mngr,
                 meta: RunMeta | None) -> _Run:
  """The model and its state: fresh, from `init_from`, or restored from `meta`'s step."""
  source = None
  if config.init_from and meta is not None:
    # Resuming: the run's own checkpoint holds the backbone; init_from is not read again.
    config = transfer.adopt_source_model(config, meta.training_config(), config.init_from)
  elif config.init_from:
    source = transfer.load_source(config.init_from)
    config = transfer.adopt_source_model(config, source.config, source.workdir)
  model = create_model(config.model, len(dataset.class_names), axis_name=parallel.AXIS,
                       backbone_bn_train=config.optim.freeze != "backbone")
  init_rng, train_rng = jax.random.split(steps.root_key(config.seed))
  state = steps.create_train_state(config, model, init_rng, steps_per_epoch)
  num_steps = steps_per_epoch * config.num_epochs
  _log_model(config, model, state, len(devices) * jax.process_count(), num_steps)
  run = _Run(config, workdir, devices, dataset, steps_per_epoch, num_steps, state,
             Progress(), 0, mngr, train_rng,
             class_weights=_class_weights(config, dataset))
  if meta is not None:
    run.changed_keys = tuple(resume.check_compatible(
        meta.training_config(), config, meta.class_names, dataset.class_names))
    run.state = checkpoint.restore_state(mngr, meta.step, state)
    run.progress, run.start_step, run.resumed_from = meta.progress, meta.step, meta.step
    log.info("Resumed from step %d (epoch %d).", meta.step, meta.epoch)
  elif source is not None:
    run.state = transfer.transplant_backbone(state, source)
  return run


def _class_weights(config, dataset: sources.Dataset) -> tuple[float, ...]:
  """train.class_weights as given, or N / (classes × count) per class of the training
  split with train.balance_classes; () when neither is set."""
  classes = len(dataset.class_names)
  if config.train.balance_classes:
    counts = np.bincount(np.asarray(dataset.train.labels), minlength=classes)
    return tuple(float(len(dataset.train.labels) / (classes * max(n, 1))) for n in counts)
  weights = tuple(float(w) for w in config.train.class_weights)
  if weights and len(weights) != classes:
    raise config_lib.ConfigError(
        f"train.class_weights has {len(weights)} weights, but the data has {classes} "
        f"classes {list(dataset.class_names)}; give one weight per class.")
  return weights


def _log_model(config, model, state, num_devices: int, num_steps: int) -> None:
  """Logs the parameter count and XLA's FLOPs per image of the inference forward pass."""
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  variables = jax.eval_shape(lambda: {"params": state.params,
                                      "batch_stats": state.batch_stats})
  flops = steps.forward_flops_per_image(model, variables, config.data.image_size)
  flops_text = "unknown" if flops is None else f"{flops / 1e9:.3f} GFLOPs"
  sizes = tuple(config.train.progressive_sizes)
  trains_at = f"; trains at {', '.join(map(str, sizes))} px" if sizes else ""
  log.info("Model %s: %s parameters, %s per %d px image (XLA, multiply-add = 2)%s; "
           "%d devices; %d steps of %d images.", config.model.name, f"{num_params:,}",
           flops_text, config.data.image_size, trains_at, num_devices, num_steps,
           config.batch_size)


def _patience_ran_out(progress: Progress, config, epoch: int) -> bool:
  """Patience counts from the latest best of either kind of weights: with a weight
  average the run stops only when neither the weights nor the average improve."""
  patience = config.train.early_stopping_patience
  bests = [best for best in (progress.best, progress.best_ema) if best is not None]
  return bool(patience) and bool(bests) and (
      epoch - max(best.epoch for best in bests) >= patience)


def _already_done(run: _Run) -> RunSummary | None:
  """The summary of a run that had ended before this call, or None if there is work."""
  step = run.start_step
  if step < run.num_steps and not (step % run.steps_per_epoch == 0 and _patience_ran_out(
      run.progress, run.config, step // run.steps_per_epoch)):
    return None
  reason = "already_finished" if step >= run.num_steps else "already_stopped_early"
  changed = (f" The config differs from the run's in {', '.join(run.changed_keys)}: "
             "those changes took no effect; use a new workdir to train with them."
             if run.changed_keys else "")
  log.warning("The workdir %s holds a run that %s at step %d; nothing was trained.%s",
              run.workdir, "finished" if reason == "already_finished" else "stopped early",
              step, changed)
  return run.summary(step, reason)


# --------------------------------------------------------------------------------- train


@dataclasses.dataclass
class _Steps:
  """The compiled programs of one run."""
  train: dict  # Training image size → its program (several with progressive resizing).
  frozen: Any  # Backpropagates through the head only; only runs while freezing.
  evaluate: Any
  frozen_for: int  # Steps the backbone stays frozen.
  schedule: Any
  finite: Any  # 1 when the parameters and batch statistics are finite on every device.
  size_at: Any  # Step → the training image size.

  def for_step(self, step: int):
    return self.frozen if step < self.frozen_for else self.train[self.size_at(step)]


def training_size(config, epoch: int) -> int:
  """The image size of training in `epoch` (from 0): train.progressive_sizes in equal
  shares of the epochs, or data.image_size."""
  sizes = tuple(config.train.progressive_sizes) or (config.data.image_size,)
  return sizes[min(epoch * len(sizes) // config.num_epochs, len(sizes) - 1)]


def pmapped_train_step(config, devices, *, freeze_backbone: bool = False,
                       class_weights: tuple[float, ...] = (), image_size: int = 0):
  """The train step as training runs it: pmapped over `devices`, the state donated.

  Call it with the state, the batch and the run's key replicated (`parallel.replicate`):
  a key placed on the devices once, not sent to each of them at every step.
  """
  options = dataclasses.replace(steps.step_options(config, class_weights),
                                freeze_backbone=freeze_backbone, image_size=image_size)
  return parallel.pmap(functools.partial(steps.train_step, options=options), devices,
                       donate_argnums=(0,))


def _finite_everywhere(params, batch_stats) -> jax.Array:
  """1 when every device's parameters and batch statistics are finite (under pmap)."""
  finite = guards.all_finite((params, batch_stats)).astype(jnp.int32)
  return jax.lax.pmin(finite, parallel.AXIS)


def _compile(run: _Run) -> _Steps:
  config, weights = run.config, run.class_weights
  size_at = lambda step: training_size(config, step // run.steps_per_epoch)
  sizes = {training_size(config, epoch) for epoch in range(config.num_epochs)}
  return _Steps({size: pmapped_train_step(config, run.devices, class_weights=weights,
                                          image_size=size) for size in sizes},
                pmapped_train_step(config, run.devices, freeze_backbone=True,
                                   class_weights=weights, image_size=size_at(0)),
                parallel.pmap(steps.eval_step, run.devices),
                optim.frozen_steps(config, run.steps_per_epoch),
                optim.learning_rate_schedule(config.optim, run.steps_per_epoch,
                                             config.num_epochs),
                parallel.pmap(_finite_everywhere, run.devices), size_at)


def _train_batches(run: _Run):
  config = run.config
  return parallel.prefetch_to_devices(loader.train_batches(
      run.dataset.train, batch_size=config.batch_size, image_size=config.data.image_size,
      seed=config.seed, num_steps=run.num_steps, start_step=run.start_step,
      workers=sources.worker_count(config.data.workers),
      process_index=jax.process_index(), process_count=jax.process_count()), run.devices)


class _Clock:
  """Images/sec since the last reading, and the time to go."""

  def __init__(self, step: int, batch_size: int):
    self.start, self.batch_size = time.perf_counter(), batch_size
    self.tick, self.tick_step, self.first_step = self.start, step, step

  def images_per_sec(self, step: int) -> float:
    now = time.perf_counter()
    speed = (step - self.tick_step) * self.batch_size / max(now - self.tick, 1e-9)
    self.tick, self.tick_step = now, step
    return speed

  def to_go(self, step: int, num_steps: int) -> str:
    per_step = (time.perf_counter() - self.start) / max(step - self.first_step, 1)
    return time.strftime("%H:%M:%S", time.gmtime(per_step * (num_steps - step)))


def _train(run: _Run) -> tuple[steps.TrainState, RunSummary]:
  config, every = run.config, run.config.checkpoint.every_steps
  programs = _compile(run)
  batches = _train_batches(run)
  writer = metric_writers.MetricWriter(run.workdir, enabled=run.is_main,
                                       purge_after=run.start_step)
  if run.is_main and run.start_step == 0 and config.train.log_images:
    _log_augmented_images(writer, run)
  replicated = parallel.replicate(run.state, run.devices)
  rng = parallel.replicate(run.train_rng, run.devices)
  bar = tqdm(total=run.num_steps, initial=run.start_step, unit="step", dynamic_ncols=True,
             disable=not (config.train.progress_bar and run.is_main))
  clock = _Clock(run.start_step, config.batch_size)
  pending, stop_reason, done = [], "finished", run.start_step
  try:
    with guards.StopSignals() as signals:
      for step in range(run.start_step, run.num_steps):
        if step == programs.frozen_for and step > 0:
          log.info("Step %d: unfreezing the backbone (learning rate x %g).", step,
                   config.optim.backbone_lr_mult)
        replicated, metrics = programs.for_step(step)(replicated, next(batches), rng)
        pending.append(metrics)
        bar.update(1)
        done = step + 1
        end_of_epoch = done % run.steps_per_epoch == 0
        periodic = bool(every) and done % every == 0
        sync_point = end_of_epoch or periodic or not done % config.train.log_every_steps
        # Several processes must save and stop at the same step: they agree on signals
        # at log intervals (one signal to any host stops them all there).
        received = distributed.signal_anywhere(signals.received, sync_point)
        if not sync_point and not received:
          continue
        _log_interval(run, writer, bar, pending, done, clock, programs.schedule)
        pending = []
        val = _end_epoch(run, writer, bar, programs, replicated, done, clock) \
            if end_of_epoch else None
        if end_of_epoch or periodic or received:
          _save(run, programs, replicated, done, val)
        if received or (end_of_epoch and _early_stop(run, done)):
          stop_reason = received or "early_stopping"
          break
    run.mngr.wait_until_finished()
    if run.is_main:
      writer.write_hparams(_hparams(config), run.progress)
  finally:
    bar.close()
    _close_quietly(writer.close)
  if stop_reason.startswith("SIG"):
    log.warning("Stopped by %s at step %d; checkpoint %d saved in %s. Run the same "
                "command again to resume.", stop_reason, done, done,
                checkpoint.checkpoint_dir(run.workdir))
  summary = run.summary(done, stop_reason)
  for callback in run.callbacks if run.is_main else ():
    callback.on_end(summary)
  return parallel.unreplicate(replicated), summary


def _hparams(config) -> dict:
  """The config keys shown in TensorBoard's hyperparameter table (scalars only)."""
  return {k: v for k, v in config_lib.flatten(config).items()
          if isinstance(v, (bool, int, float, str)) and not k.startswith(("checkpoint.",
                                                                             "train.log"))}


# ----------------------------------------------------------- log, evaluate, save, stop


def _log_interval(run: _Run, writer, bar, pending: list, done: int, clock: _Clock,
                  schedule) -> None:
  """One device→host transfer per log interval: losses checked, summed and written."""
  rows = [{k: float(v[0]) for k, v in m.items()} for m in jax.device_get(pending)]
  guards.check_losses([r["loss"] for r in rows], done, run.workdir,
                      run.config.optim.learning_rate)
  for offset, row in enumerate(rows):
    run.progress.epoch_sums.add(row["loss"], row["accuracy"])
    for callback in run.callbacks if run.is_main else ():
      callback.on_step(done - len(rows) + offset + 1, row)
  interval = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  speed = clock.images_per_sec(done)
  epoch = (done - 1) // run.steps_per_epoch + 1
  writer.write(done, "train", {**interval, "learning_rate": float(schedule(done - 1)),
                               "images_per_sec": speed}, epoch=epoch)
  bar.set_postfix(loss=f"{interval['loss']:.4f}", img_s=f"{speed:.0f}")


def evaluate(state: steps.TrainState, source, config: ml_collections.ConfigDict,
             devices=None) -> dict:
  """Loss and accuracy over every example of `source` (exact: padding is masked)."""
  devices = list(devices or jax.local_devices())
  return _evaluate(parallel.pmap(steps.eval_step, devices),
                   parallel.replicate(state, devices), source, config, devices)


def _evaluate(p_eval_step, replicated_state, source, config, devices) -> dict:
  batches = loader.eval_batches(
      source, batch_size=config.batch_size, image_size=config.data.image_size,
      workers=sources.worker_count(config.data.workers),
      process_index=jax.process_index(), process_count=jax.process_count())
  totals = None
  for batch in parallel.prefetch_to_devices(batches, devices):
    sums = p_eval_step(replicated_state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(jax.tree.map(lambda x: x[0], totals))
  count = int(totals["count"])
  return {"loss": float(totals["loss"]) / count,
          "accuracy": int(totals["correct"]) / count, "count": count}


def _end_epoch(run: _Run, writer, bar, programs: _Steps, replicated, done: int,
               clock: _Clock) -> dict:
  """Validation over the whole set; the epoch's means and the best so far recorded."""
  epoch = done // run.steps_per_epoch
  val = _evaluate(programs.evaluate, replicated, run.dataset.val, run.config, run.devices)
  writer.write(done, "val", val, epoch=epoch, time=round(run.elapsed(), 3))
  ema = None
  if replicated.ema is not None:  # The weight average, on the same images.
    averaged = replicated.replace(params=replicated.ema["params"],
                                  batch_stats=replicated.ema["batch_stats"])
    ema = _evaluate(programs.evaluate, averaged, run.dataset.val, run.config, run.devices)
    writer.write(done, "val_ema", ema, epoch=epoch, time=round(run.elapsed(), 3))
  writer.flush()
  progress = run.progress
  sums = progress.epoch_sums
  progress.last_epoch = EpochMetrics(epoch, done, sums.loss / sums.steps,
                                     sums.accuracy / sums.steps, val["loss"],
                                     val["accuracy"], ema and ema["loss"],
                                     ema and ema["accuracy"])
  progress.epoch_sums = EpochSums()
  if progress.best is None or val["accuracy"] > progress.best.val_accuracy:
    progress.best = Best(val["accuracy"], epoch, done)
  if ema is not None and (progress.best_ema is None
                          or ema["accuracy"] > progress.best_ema.val_accuracy):
    progress.best_ema = Best(ema["accuracy"], epoch, done)  # The average's own best.
  if run.is_main:
    last = progress.last_epoch
    bar.write(f"epoch {epoch}/{run.config.num_epochs}  step {done}  "
              f"train loss {last.train_loss:.4f} acc {last.train_accuracy:.4f}  "
              f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}  "
              + (f"ema acc {ema['accuracy']:.4f}  " if ema else "")
              + f"({clock.to_go(done, run.num_steps)} to go)")
    for callback in run.callbacks:
      callback.on_epoch(epoch, dataclasses.asdict(last))
  return val


def _save(run: _Run, programs: _Steps, replicated, done: int, val: dict | None) -> None:
  """A checkpoint of step `done`, after checking that nothing in it is NaN or infinite.

  The check runs on the devices (one integer comes back); only a finite state is copied
  to the host for the checkpoint.
  """
  if not parallel.unreplicate(programs.finite(replicated.params, replicated.batch_stats)):
    raise guards.diverged("the parameters became NaN or infinite", done, run.workdir,
                          run.config.optim.learning_rate)
  state = parallel.unreplicate(replicated)
  run.progress.elapsed_seconds = run.elapsed()
  meta = RunMeta(config=run.config.to_dict(), class_names=run.dataset.class_names,
                 step=done, epoch=done // run.steps_per_epoch, progress=run.progress)
  workdir_lib.save_checkpoint(run.mngr, state, meta,
                              val_accuracy=val["accuracy"] if val else None)


def _early_stop(run: _Run, done: int) -> bool:
  epoch = done // run.steps_per_epoch
  if not _patience_ran_out(run.progress, run.config, epoch):
    return False
  best, best_ema = run.progress.best, run.progress.best_ema
  log.info("Early stopping after epoch %d: no better validation accuracy since epoch %d "
           "(%.4f)%s, patience %d.", epoch, best.epoch, best.val_accuracy,
           f", nor of the weight average since epoch {best_ema.epoch} "
           f"({best_ema.val_accuracy:.4f})" if best_ema else "",
           run.config.train.early_stopping_patience)
  return True


def _log_augmented_images(writer: metric_writers.MetricWriter, run: _Run) -> None:
  """Puts a grid of augmented training images in TensorBoard (step 0).

  The first images of a training order go through `augment.augment` with the run's
  settings (its own random draw), so a wrong setting shows before hours are spent.
  It runs jitted on the host CPU, leaving the accelerators to training.
  """
  config, source = run.config, run.dataset.train
  count = config.train.log_images
  batch = next(loader.train_batches(
      source, batch_size=min(count, len(source)), image_size=config.data.image_size,
      seed=config.seed, num_steps=1, workers=1))
  try:
    device = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU: use the default device.
    device = jax.local_devices()[0]
  apply = jax.jit(functools.partial(augment.augment,
                                    options=augment.Options.from_config(config.augment)))
  images = apply(jax.device_put(jax.random.fold_in(run.train_rng, 0), device),
                 jax.device_put(batch["image"], device))
  writer.write_images(0, "train/augmented_images", np.asarray(images))


def _close_quietly(close) -> None:
  """Closes after an error without hiding it; on success the errors were seen already."""
  try:
    close()
  except Exception as e:  # Already failing (disk full); keep the first error.
    log.debug("Ignoring %r while closing.", e)
