"""What can stop a run, and how it stops without losing what is saved.

- A full or read-only workdir: `named_write_errors` turns the error (an OSError, or the
  TensorStore error Orbax's background writes raise) into a `WorkdirError` that says the
  checkpoints already there are intact and how to resume.
- Divergence: `check_losses` and `all_finite` raise `TrainingDivergedError` before a NaN
  or an infinity can reach a checkpoint.
- SIGTERM and Ctrl-C: `StopSignals` asks the loop to save at the current step and stop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import checkpoint
from jaxcls.errors import JaxclsError

# OSError numbers that mean "the workdir cannot take more writes".
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

log = logging.getLogger("jaxcls")


class WorkdirError(JaxclsError, OSError):
  """The workdir cannot be created or written, or holds a run that may not be used."""


class TrainingDivergedError(JaxclsError, RuntimeError):
  """The loss or the parameters became NaN or infinite; nothing after that was saved."""


# ----------------------------------------------------------------------- write errors


def write_error_cause(error: BaseException, workdir: str) -> OSError | None:
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
    latest = checkpoint.latest_complete_step(workdir)
  except Exception:  # An unreadable folder must not hide the original error.
    latest = None
  kept = ("There were no checkpoints yet." if latest is None else
          f"The checkpoints already there are intact (latest complete: step {latest}).")
  where = f" ({cause.filename})" if cause.filename else ""
  return WorkdirError(
      f"Cannot write to the workdir '{workdir}': {cause.strerror or cause}{where}. "
      f"{kept} Free some space or fix the permissions, then rerun the same command to "
      "resume.")


@contextlib.contextmanager
def named_write_errors(workdir: str):
  """Re-raises a full or unwritable workdir, however it surfaced, as a WorkdirError."""
  try:
    yield
  except WorkdirError:
    raise
  except Exception as e:
    absolute = os.path.abspath(os.path.expanduser(workdir))
    cause = write_error_cause(e, absolute)
    if cause is None:
      raise
    raise _write_error(cause, absolute) from e


# ------------------------------------------------------------------------- divergence


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every float in `tree` is finite: one scalar, so one tiny transfer."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def diverged(what: str, step: int, workdir: str,
             learning_rate: float) -> TrainingDivergedError:
  good = checkpoint.latest_complete_step(workdir)
  kept = ("no checkpoint had been saved yet" if good is None else
          f"the last good checkpoint, step {good} in {checkpoint.checkpoint_dir(workdir)}, "
          "is kept and a rerun resumes from it")
  return TrainingDivergedError(
      f"Training stopped: {what} at step {step}. Nothing was saved after it; {kept}. "
      f"Lower optim.learning_rate (now {learning_rate}) or check the data.")


def check_losses(losses: list[float], last_step: int, workdir: str,
                 learning_rate: float) -> None:
  """Raises if any loss (of the steps ending at `last_step`) is NaN or infinite."""
  for offset, loss in enumerate(losses):
    if not np.isfinite(loss):
      step = last_step - len(losses) + offset + 1
      raise diverged(f"the loss was {loss}", step, workdir, learning_rate)


# ----------------------------------------------------------------------- stop signals


class StopSignals:
  """SIGTERM or Ctrl-C ask the loop to save at the current step and stop cleanly.

  The previous handlers come back as soon as one signal arrives, so a second Ctrl-C
  still interrupts a run that seems stuck. Only the main thread may install handlers;
  elsewhere this does nothing.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self) -> "StopSignals":
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
