"""Figures and tables of what a trained model learned, on its validation set.

    jaxcls-report --workdir DIR [--step N] [--out FOLDER] [--top-k 24] [--bins 10]
                  [--targets 0.9,0.95]

Writes DIR/report/ (see `jaxcls/report.py` for what is in it) and prints its path.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jaxcls.cli import common


def build_parser() -> common.Parser:
  parser = common.Parser(
      prog="jaxcls-report",
      description="Figures and tables of what a trained model learned (validation set).")
  parser.add_argument("--workdir", required=True, help="The training run's workdir.")
  parser.add_argument("--step", type=int, default=None,
                      help="Checkpoint step (default: the one predict uses).")
  parser.add_argument("--out", default=None, help="Report folder (default WORKDIR/report).")
  parser.add_argument("--top-k", type=int, default=24,
                      help="Images in the top-losses gallery (default 24).")
  parser.add_argument("--bins", type=common.positive_int, default=10,
                      help="Confidence bins for the calibration error (default 10).")
  parser.add_argument("--targets", type=_accuracies, default=(0.90, 0.95),
                      help="Validation accuracies whose first time the report gives, "
                           "comma-separated (default 0.9,0.95).")
  parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
  return parser


def _accuracies(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(part) for part in text.split(","))
  except ValueError:
    values = ()
  if not values or not all(0 < value <= 1 for value in values):
    raise argparse.ArgumentTypeError(f"'{text}' is not accuracies in (0, 1], "
                                     "comma-separated, e.g. 0.9,0.95")
  return values


def _report(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  if args.top_k < 0:
    raise common.UsageError(f"--top-k={args.top_k}; use 0 or more.")
  from jaxcls import report
  summary = report.build_report(args.workdir, args.step, args.out, top_k=args.top_k,
                                bins=args.bins, progress=not args.no_progress,
                                targets=args.targets)
  print(f"step {summary['step']}: {summary['count']} validation images, accuracy "
        f"{summary['accuracy']:.4f}, loss {summary['loss']:.4f}, "
        f"ECE {summary['ece']:.4f}")
  recorded = summary["recorded_accuracy"]
  if recorded is not None and abs(recorded - summary["accuracy"]) > 1e-9:
    print(f"warning: metrics.jsonl recorded accuracy {recorded:.4f} at this step; the "
          "validation files may have changed since training.", file=sys.stderr)
  for what, when in report.time_to_accuracy_lines(summary):
    print(f"{what}: {when}")
  print(report.format_table(summary["per_class"]))
  print(summary["report_dir"])
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  common.configure_process()
  return common.run(lambda: _report(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
