"""Tune hyperparameters: an Optuna study whose trials are ordinary jaxcls runs.

    jaxcls-sweep --config configs/catdog.py --workdir DIR --trials 20 \
        --space 'optim.learning_rate=loguniform(1e-3,1e-1)' \
        --space 'train.label_smoothing=uniform(0,0.2)' [--config.KEY=VALUE ...]

Also `python -m jaxcls.cli.sweep`. Trials train in DIR/trial_NNN/; the study is kept in
DIR/study.db, so the same command again continues the sweep to N trials. Writes
DIR/trials.csv, DIR/best_config.py and DIR/plots/ (docs/sweep.md). Exit status: 0 when
the study holds N trials, 2 for a problem the message names, 128 + the signal's number
after SIGTERM or Ctrl-C in a trial (the trial runs again, from its checkpoint, next time).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Sequence

from jaxcls.cli import common

SPACE_HELP = ("KEY=loguniform(LO,HI), KEY=uniform(LO,HI), KEY=int(LO,HI) or "
              "KEY=choice(A,B,...) for any config key; repeat for more keys.")


def build_parser() -> common.Parser:
  parser = common.Parser(
      prog="jaxcls-sweep",
      description="Search hyperparameters with Optuna (TPE sampling, pruning after each "
                  "epoch). Each trial is a training run in DIR/trial_NNN; running the "
                  "same command again continues the sweep.")
  common.add_config_flag(parser)
  parser.add_argument("--workdir", required=True,
                      help="The sweep's folder: study.db, trial_NNN/, trials.csv, "
                           "best_config.py, plots/.")
  parser.add_argument("--trials", type=common.positive_int, required=True, metavar="N",
                      help="How many trials the study holds when done (completed, pruned "
                           "or diverged; those of earlier runs of the command count).")
  parser.add_argument("--space", action="append", default=[], metavar="SPEC",
                      help=SPACE_HELP)
  parser.add_argument("--space-file", default="", metavar="FILE.py",
                      help="A Python file defining space(trial) -> {config key: value} "
                           "with Optuna's trial.suggest_* (for what --space cannot say).")
  parser.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                      help="median (default): stop a trial whose best validation accuracy "
                           "is below the median of completed trials at the same epoch, "
                           "from epoch 2 and after 5 completed trials; hyperband; none.")
  parser.add_argument("--storage", default=None, metavar="URL",
                      help="Optuna RDB storage (default sqlite:///DIR/study.db); "
                           "postgresql://USER:PASSWORD@HOST/DB lets several machines share "
                           "one study.")
  parser.add_argument("--study-name", default="jaxcls-sweep",
                      help="The study's name in the storage (default jaxcls-sweep).")
  parser.add_argument("--seed", type=int, default=None,
                      help="The sampler's seed (default: none; workers that share a study "
                           "need different seeds or none).")
  common.add_cache_flags(parser)
  return parser


def _space(args, config):
  """The search space from the flags, checked against the config (SpaceError if bad)."""
  sweep = _import_sweep()
  if not args.space and not args.space_file:
    raise common.UsageError("give the search space: --space KEY=DIST(...) or "
                            "--space-file FILE.py.")
  dims = sweep.parse_space(args.space, config)
  function = sweep.load_space_file(args.space_file) if args.space_file else None
  space = sweep.Space(dims, function, f"--space-file {args.space_file}")
  space.check(config)
  return space


def _check_not_overridden(space, overrides) -> None:
  given = {key for key, _ in overrides}
  for dim in space.dims:
    if dim.key in given:
      raise common.UsageError(f"{dim.key} is both set (--config.{dim.key}) and searched "
                              f"(--space '{dim.text}'); drop one.")


def _import_sweep():
  try:
    import optuna
  except ImportError as e:
    raise common.UsageError(f"jaxcls-sweep needs Optuna, which cannot be imported ({e}): "
                            "pip install 'jaxcls[sweep]'.") from None
  optuna.logging.set_verbosity(optuna.logging.ERROR)  # jaxcls logs each trial itself.
  from jaxcls import sweep
  return sweep


def _sweep(argv, trial_callbacks=None) -> int:
  args, overrides = common.parse(build_parser(), argv)
  config = common.load_config(args.config, overrides)
  sweep = _import_sweep()
  from jaxcls import config as config_lib
  config_lib.validate(config)
  space = _space(args, config)
  _check_not_overridden(space, overrides)
  common.setup_logging()
  common.enable_compilation_cache(args.compilation_cache, args.no_compilation_cache)
  try:
    result = sweep.run_sweep(
        config, args.workdir, args.trials, space, recipe=args.config, overrides=overrides,
        pruner=sweep.make_pruner(args.pruner, config.num_epochs),
        sampler=sweep.make_sampler(args.seed), storage=args.storage,
        study_name=args.study_name, space_file=args.space_file,
        trial_callbacks=trial_callbacks)
  except sweep.SweepStopped as e:
    print(f"Stopped by {e.signal_name} in trial {e.trial_number}; its checkpoint is saved "
          "and its parameters run again, from there, when the sweep continues. To "
          f"continue, run the same command again:\n  {shlex.join(sys.argv)}",
          file=sys.stderr)
    return 128 + getattr(signal, e.signal_name)
  print(result.summary)
  print("Wrote " + ", ".join(result.files) + ".")
  if os.path.join(args.workdir, "best_config.py") in result.files:
    print("Train the best settings: python run_train.py --config "
          f"{os.path.join(args.workdir, 'best_config.py')} --workdir WORKDIR")
  return 0


def main(argv: Sequence[str] | None = None, *, trial_callbacks=None) -> int:
  """`trial_callbacks(trial)` may add jaxcls.tracking callbacks to each trial's run."""
  common.configure_process(tune_allocator=True)  # Before JAX; may re-execute.
  return common.run(lambda: _sweep(argv, trial_callbacks))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
