"""Checkpoints with Orbax: the train state plus the metadata needed to rebuild the model.

A checkpoint at step N is the folder `WORKDIR/checkpoints/N/` with these items:
- `state`: step, params, batch_stats and optimizer state, saved unreplicated so that it
  restores on any number of devices;
- `meta`: JSON with the config, the class names, the epoch, the metrics at that step,
  the best validation result so far and the running sums of the epoch in progress (its
  format is `jaxcls.workdir.RunMeta`'s, which owns it);
- `metrics`: Orbax's own record of the validation accuracy (epoch ends only), and of
  the weight average's when the run keeps one, which rank the checkpoints.

Which checkpoints stay: the last `keep`, plus the one with the best validation accuracy
(ties go to the earlier step), which is never rotated away, and with a weight average
(optim.ema_decay > 0) the one where the average's accuracy was best: each kind of
weights has its best checkpoint. Mid-epoch checkpoints carry no validation accuracy and
are never "best".

With several processes every process calls `save` and `restore_state` (Orbax
coordinates them; one process writes each array), and the workdir must be on storage
every host can see. The process count may change between saving and restoring.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a
crash during a save leaves the previous checkpoint as the latest; leftover temporary
folders are removed the next time a writable manager opens the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


# The metric that ranks the checkpoints of each kind of weights (`workdir.WEIGHTS`):
# the weights themselves, or their exponential moving average.
RANKED_BY = {"raw": "val_accuracy", "ema": "val_ema_accuracy"}


def ranking_key(metrics: dict, weights: str = "raw") -> tuple:
  """Orders checkpoints from worst to best for `weights` ("raw" or "ema"): their
  validation accuracy, then the earlier step.

  Checkpoints saved mid-epoch have no validation accuracy and rank below every
  validated one.
  """
  accuracy = metrics.get(RANKED_BY[weights])
  if accuracy is None:
    return (0, 0.0, 0)
  return (1, float(accuracy), -int(metrics["step"]))


@contextlib.contextmanager
def _orbax_notices_hidden():
  """Orbax logs two warnings through absl for every read-only manager ("read only",
  "setting save_interval_steps=0"): expected when reading, noise to a library user."""
  logger = logging.getLogger("absl")
  previous = logger.level
  logger.setLevel(max(previous, logging.ERROR))
  try:
    yield
  finally:
    logger.setLevel(previous)


def manager(workdir: str, keep: int = 3, read_only: bool = False,
            async_save: bool = True) -> ocp.CheckpointManager:
  """A manager that keeps the last `keep` checkpoints and the best one of each kind of
  weights. (Without a weight average every checkpoint ties on its ranking, and the tie
  keeps the latest, which LatestN keeps anyway.)"""
  keep_policy = None
  if not read_only:
    keep_policy = policies.AnyPreservationPolicy([policies.LatestN(n=keep)] + [
        policies.BestN(get_metric_fn=functools.partial(ranking_key, weights=weights),
                       n=1, keep_checkpoints_without_metrics=False)
        for weights in RANKED_BY])
  with _orbax_notices_hidden() if read_only else contextlib.nullcontext():
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, preservation_policy=keep_policy,
        best_fn=ranking_key, best_mode="max", cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save and not read_only)
    mngr = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("state", "meta"))
  # Orbax removes leftover temporary folders in a background thread that close() does
  # not wait for (orbax-checkpoint 0.12.8): a program failing right after this call
  # exits under it, and the thread prints a traceback. Wait for it here: one listing.
  if not read_only:
    _await_startup_cleanup(mngr)
  return mngr


def _await_startup_cleanup(mngr: ocp.CheckpointManager) -> None:
  wait = getattr(mngr, "_maybe_await_cleanup_tmp_directory", None)
  if wait is not None:  # A private method: absent in another version, skip the wait.
    wait()


def latest_complete_step(workdir: str) -> int | None:
  """The newest checkpoint on disk that was fully written (temporary folders ignored)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  mngr = manager(workdir, read_only=True)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         val_accuracy: float | None = None,
         val_ema_accuracy: float | None = None) -> None:
  """Saves asynchronously; the host copy of `state` is taken before this returns.

  `val_accuracy` (and the weight average's `val_ema_accuracy`) are given at epoch ends
  only: they rank checkpoints for "best".
  """
  metrics = {"step": int(step)}
  for weights, accuracy in (("raw", val_accuracy), ("ema", val_ema_accuracy)):
    if accuracy is not None:
      metrics[RANKED_BY[weights]] = float(accuracy)
  mngr.save(step, metrics=metrics, args=ocp.args.Composite(
      state=ocp.args.StandardSave(global_state(saved_items(state))),
      meta=ocp.args.JsonSave(meta)))


def saved_items(state: Any) -> dict:
  """A train state's arrays by field, as a checkpoint holds them. A field that is None
  (no weight average, say) is left out: such a state has the tree of one written before
  the field existed, so old checkpoints restore."""
  return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
          if field.metadata.get("pytree_node", True)
          and getattr(state, field.name) is not None}


def _replicated_everywhere() -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def global_state(state: Any) -> Any:
  """With several processes, makes each array one array replicated on every device.

  An unreplicated train state holds host arrays (or arrays on one local device) in
  each process; Orbax refuses to save host-local jax.Arrays in a multi-process run,
  because it cannot tell that they are equal everywhere. The train state is equal on
  every process (its updates are averaged over all devices), so each process
  contributes its own copy to one fully replicated global array.
  """
  if jax.process_count() == 1:
    return state
  sharding = _replicated_everywhere()

  def to_global(x):
    if not isinstance(x, (jax.Array, np.ndarray)):
      return x
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(to_global, state)


def best_step(mngr: ocp.CheckpointManager, weights: str = "raw") -> int | None:
  """The step where `weights` ("raw", or "ema": the weight average) had the best
  validation accuracy, or the latest if none was validated.

  Checkpoints written before jaxcls 0.3 record no accuracy of the average: for them the
  average's best is the weights' best, as it was then.
  """
  if weights == "ema":
    ranked = [(ranking_key(mngr.metrics(step) or {}, weights), step)
              for step in mngr.all_steps()]
    validated = [(key, step) for key, step in ranked if key[0]]
    if validated:
      return max(validated)[1]
  best = mngr.best_step()
  return mngr.latest_step() if best is None else best


def restore_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict:
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return restored["meta"]


def restore_state(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores `state` into the structure, shapes and dtypes of `target` (host arrays).

  With several processes the arrays are read as global replicated arrays (the form
  Orbax restores across processes) and handed back as this process's local copy.
  """
  device = jax.local_devices()[0]
  multi = jax.process_count() > 1

  def abstract(x):
    if not hasattr(x, "shape"):  # A Python scalar, such as a fresh state's step.
      x = np.asarray(x)
    if multi:
      sharding = _replicated_everywhere()
    else:
      sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(device)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  abstract = jax.tree.map(abstract, saved_items(target))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  if multi:
    restored = jax.tree.map(lambda x: x.addressable_data(0), restored)
  return target.replace(**restored)
