"""Train a classifier: flags → `jaxcls.train.train_and_evaluate(config, workdir)`.

    python run_train.py --config configs/catdog.py --workdir DIR [--config.KEY=VALUE ...]

Also `jaxcls-train` and `python -m jaxcls.cli.train`. Exit status: 0 when the run ended
(or had ended before), 2 for a problem the message names, 3 when training diverged, and
128 + the signal's number after SIGTERM or Ctrl-C (a checkpoint of that step is saved;
the same command resumes).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from typing import Sequence

from jaxcls.cli import common


def build_parser() -> common.Parser:
  parser = common.Parser(
      prog=os.path.basename(sys.argv[0]) if sys.argv[0].endswith("run_train.py")
      else "jaxcls-train",
      description="Train an image classifier, validating after every epoch. Running the "
                  "same command again resumes an interrupted run.")
  common.add_config_flag(parser)
  parser.add_argument("--workdir", required=True,
                      help="Where checkpoints, metrics and logs go (created if needed).")
  parser.add_argument("--resume", choices=("auto", "never", "require"), default="auto",
                      help="auto (default): continue the workdir's run if it holds one; "
                           "never: refuse a workdir that holds one; require: refuse one "
                           "that does not.")
  group = parser.add_argument_group(
      "several processes or hosts (run the same command on each; docs/multihost.md)")
  group.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                     help="Start JAX's distributed runtime: auto = when the flags below "
                          "are given or the environment is a multi-process SLURM/MPI job "
                          "or TPU slice; on = always (JAX detects what is not given); "
                          "off = never.")
  group.add_argument("--coordinator-address", "--coordinator_address", default=None,
                     metavar="HOST:PORT", help="Process 0's address, the same on every "
                                               "process.")
  group.add_argument("--num-processes", "--num_processes", type=int, default=None,
                     metavar="N", help="How many processes in all.")
  group.add_argument("--process-id", "--process_id", type=int, default=None, metavar="I",
                     help="This process's id, 0..N-1.")
  common.add_cache_flags(parser)
  return parser


def resume_command() -> str:
  """The command line that started this run: running it again resumes."""
  argv = list(sys.argv)
  if argv and argv[0].endswith(".py"):
    return "python " + shlex.join(argv)
  return shlex.join(argv)


def _report(summary, config, workdir: str) -> None:
  """Process 0's last words on how the run ended."""
  last = summary.last_epoch
  if summary.stop_reason == "early_stopping":
    print(f"Stopped early at step {summary.final_step}: validation accuracy had not "
          f"improved for {config.train.early_stopping_patience} epoch(s).")
  elif not summary.trained:
    print(f"Nothing to do: the run in {workdir} had already "
          f"{'finished' if summary.stop_reason == 'already_finished' else 'stopped early'}"
          f" at step {summary.final_step}.", file=sys.stderr)
    if summary.changed_keys:
      print(f"The config differs from that run's in {', '.join(summary.changed_keys)}; "
            "use a new --workdir to train with it.", file=sys.stderr)
  if last is not None:
    print(f"Done: epoch {last.epoch}, val accuracy {last.val_accuracy:.4f}, "
          f"val loss {last.val_loss:.4f}. Workdir: {workdir}")


def _train(argv) -> int:
  args, overrides = common.parse(build_parser(), argv)
  config = common.load_config(args.config, overrides)
  common.setup_logging()
  common.enable_compilation_cache(args.compilation_cache, args.no_compilation_cache)
  from jaxcls import distributed, train  # JAX loads here, after the flags were read.
  distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                         args.process_id)
  if not distributed.is_main_process():
    logging.getLogger("jaxcls").setLevel(logging.WARNING)  # Process 0 tells the story.
  try:
    _, summary = train.train_and_evaluate(config, args.workdir, resume=args.resume)
  except train.TrainingDivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  if summary.stop_reason.startswith("SIG"):
    print(f"Stopped by {summary.stop_reason} at step {summary.final_step}; a checkpoint "
          f"of that step is saved in {args.workdir}. To resume, run the same command "
          f"again:\n  {resume_command()}", file=sys.stderr)
    return 128 + getattr(signal, summary.stop_reason)
  if distributed.is_main_process():
    _report(summary, config, args.workdir)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  common.configure_process(tune_allocator=True)  # Before JAX; may re-execute.
  return common.run(lambda: _train(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
