"""Command-line entry point: flags → `jaxcls.train.train_and_evaluate(config, workdir)`.

    python run_train.py --config configs/catdog.py --workdir DIR [--config.KEY=VALUE ...]
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxcls import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file (configs/*.py); override keys with --config.KEY=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-host: run the same command on every host (see the README's multi-host section).
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Start JAX's distributed runtime: auto = when the flags below are given or the "
    "environment is a multi-process SLURM/MPI job or TPU slice; on = always (JAX "
    "auto-detects what is not given, e.g. on a Compute Engine TPU slice); off = never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..N-1.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "jax", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  _enable_compilation_cache()
  from jaxcls import distributed  # Imports JAX only after flags are parsed.
  from jaxcls import train
  from jaxcls.data import sources
  from jaxcls.data.preprocess import ImageError
  try:
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not distributed.is_main_process():
    logging.getLogger("jaxcls").setLevel(logging.WARNING)  # Process 0 tells the story.
  try:
    _, final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, sources.DataError, train.WorkdirError, ImageError,
          distributed.DistributedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.TrainingDivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  if final.get("stop_reason", "").startswith("SIG"):
    _exit_after_signal(final)
  if not distributed.is_main_process():
    return  # Process 0 reports how the run ended.
  if final.get("stop_reason") == "early_stopping":
    print(f"Stopped early at step {final['final_step']}: validation accuracy had not "
          f"improved for {_CONFIG.value.train.early_stopping_patience} epoch(s).")
  if final.get("epoch"):
    print(f"Done: epoch {final['epoch']}, val accuracy {final['val_accuracy']:.4f}, "
          f"val loss {final['val_loss']:.4f}. Workdir: {_WORKDIR.value}")


def _enable_compilation_cache() -> None:
  """JAX's persistent compilation cache for training, as predict uses it.

  A second run of the same config (a resume, or the same recipe on other data) loads
  the compiled steps instead of compiling them. JAXCLS_COMPILATION_CACHE picks the
  folder or turns it off; a JAX_COMPILATION_CACHE_DIR set by the user is left alone.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  from jaxcls import predict
  path = predict.resolve_cache_dir()
  if path:
    predict.enable_compilation_cache(
        path, hint="Set JAXCLS_COMPILATION_CACHE=DIR, or =off to turn it off.")


def resume_command() -> str:
  """The command line that started this run: running it again resumes."""
  argv = list(sys.argv)
  if argv and argv[0].endswith(os.path.join("jaxcls", "main.py")):
    return "python -m jaxcls.main " + shlex.join(argv[1:])
  if argv and argv[0].endswith(".py"):
    return "python " + shlex.join(argv)
  return shlex.join(argv)


def _exit_after_signal(final: dict) -> None:
  """Exits 128 + signal number, as shells and schedulers expect, after a clean save."""
  name = final["stop_reason"]
  print(f"Stopped by {name} at step {final['final_step']}; a checkpoint of that step is "
        f"saved in {_WORKDIR.value}. To resume, run the same command again:\n"
        f"  {resume_command()}", file=sys.stderr)
  sys.exit(128 + getattr(signal, name))


def run():
  app.run(main)


def cli():
  """`run_train.py`, `jaxcls-train` and `python -m jaxcls.main`: `run()` once the process
  has huge-page allocation where that helps (see `jaxcls/_launch.py`). This module has
  not imported JAX yet, so a re-execution costs little."""
  from jaxcls import _launch
  _launch.reexec_with_tuned_allocator()
  run()


if __name__ == "__main__":
  cli()
