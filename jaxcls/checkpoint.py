"""Checkpoints with Orbax: the train state plus the metadata needed to rebuild the model.

A checkpoint at step N is the folder `WORKDIR/checkpoints/N/` with two items:
- `state`: step, params, batch_stats and optimizer state, saved unreplicated so that it
  restores on any number of devices;
- `meta`: JSON with the config, the class names, the epoch and the metrics at that step.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a
crash during a save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves asynchronously; the host copy of `state` is taken before this returns."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)))


def restore_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict:
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return restored["meta"]


def restore_state(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores `state` into the structure, shapes and dtypes of `target` (host arrays)."""
  device = jax.local_devices()[0]

  def abstract(x):
    if not hasattr(x, "shape"):  # A Python scalar, such as a fresh state's step.
      x = np.asarray(x)
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(device)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  abstract = jax.tree.map(abstract, target)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  return restored["state"]
