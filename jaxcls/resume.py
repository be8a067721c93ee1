"""What a run may change when it continues from a workdir's checkpoint.

A checkpoint restores only into the same model and the same optimizer-state structure,
so changes to those are errors that say how to go on; any other changed key is allowed,
logged, and reported in the run's summary (`RunSummary.changed_keys`).
"""

from __future__ import annotations

import logging

import numpy as np

from jaxcls import config as config_lib
from jaxcls import models, optim
from jaxcls.guards import WorkdirError

MODES = ("auto", "never", "require")
# Changing these between runs on one workdir changes the model's structure or inputs.
STRUCTURE_KEYS = ("model.name", "model.widths", "model.input_mean", "model.input_std",
                  "model.head_hidden", "data.image_size")
# Changing these on resume is harmless: not reported. Any other change is.
QUIET_KEYS = ("data.workers", "train.progress_bar", "train.log_every_steps",
              "checkpoint.keep", "checkpoint.every_steps", "checkpoint.async_save")

log = logging.getLogger("jaxcls")


def check_mode(mode: str, workdir: str, has_checkpoint: bool) -> None:
  """`resume="never"` refuses a workdir with checkpoints, `"require"` one without."""
  if mode not in MODES:
    raise config_lib.ConfigError(f"resume={mode!r}; use one of {', '.join(MODES)}.")
  if mode == "never" and has_checkpoint:
    raise WorkdirError(
        f"The workdir '{workdir}' already holds a run, and resume='never'. Use a new "
        "workdir, or resume='auto' to continue that run.")
  if mode == "require" and not has_checkpoint:
    raise WorkdirError(f"The workdir '{workdir}' holds no checkpoint to resume from, and "
                       "resume='require'. Check the path, or use resume='auto'.")


def _value(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def check_compatible(saved, config, saved_classes, classes) -> list[str]:
  """Errors on changes to the model, its inputs or the optimizer state's structure.

  `saved` is the config the checkpoint was trained with. Returns the other keys whose
  value changed (logged as warnings), sorted.
  """
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
        "switching the optimizer, or turning momentum, weight decay, L1, clipping, "
        "freezing, a backbone rate or the weight average (EMA) on or off, changes its "
        "structure. Set the key back to resume, or use a new --workdir "
        "(with --config.init_from=OLD_WORKDIR to start from its weights).")
  old, new = config_lib.flatten(saved), config_lib.flatten(config)
  # "auto" is the dtype it resolves to here: float32 → auto on a CPU changes nothing.
  for values in (old, new):
    if "model.dtype" in values:
      values["model.dtype"] = models.resolve_dtype(values["model.dtype"]).name
  changed = [k for k in sorted(new) if k not in QUIET_KEYS and old.get(k) != new[k]]
  for key in changed:
    log.warning("Resuming with %s=%r; the checkpoint was trained with %r. Continuing "
                "with the new value.", key, new[key], old.get(key))
  return changed
