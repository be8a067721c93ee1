"""Evaluate a trained model on held-out data: accuracy, loss and per-class scores.

    jaxcls-evaluate --workdir DIR --data folder:TEST_DIR [--step N] [--json] [--report OUT]
    jaxcls-evaluate --workdir DIR --data zip:TEST.zip
    jaxcls-evaluate --workdir DIR --data tfds:cats_vs_dogs --split 'train[80%:]'

Every example of the data is evaluated (nothing is split off), with the preprocessing
and the masked evaluation of training (`jaxcls/evaluate.py`). Files that cannot be
decoded are skipped and listed: on standard error as `skipped: PATH: REASON` lines (in
`"skipped"` with --json), and in OUT/skipped_files.jsonl with --report. A class folder
the model does not know is an error naming it; a set with some of the model's classes
is fine. Nothing is written into the training's workdir.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Sequence

from jaxcls.cli import common


def build_parser() -> common.Parser:
  parser = common.Parser(
      prog="jaxcls-evaluate",
      description="Accuracy, loss and per-class precision/recall/F1 of a trained model "
                  "on held-out data: every example of a folder, a zip or a TFDS split.")
  parser.add_argument("--workdir", required=True, help="The training run's workdir.")
  parser.add_argument("--data", required=True, metavar="KIND:ARG",
                      help="folder:PATH or zip:PATH (one subfolder per class, named like "
                           "the model's classes), or tfds:NAME with --split.")
  parser.add_argument("--split", default=None,
                      help="The TFDS split to evaluate, e.g. test or 'train[80%%:]'.")
  parser.add_argument("--step", type=int, default=None,
                      help="Checkpoint step (default: the best by val accuracy, as "
                           "predict picks it).")
  common.add_weights_flag(parser)
  parser.add_argument("--json", action="store_true",
                      help="Print one JSON object instead of text.")
  parser.add_argument("--report", default=None, metavar="OUT",
                      help="Also write the report's figures and tables for this data "
                           "(and skipped_files.jsonl) into the folder OUT.")
  parser.add_argument("--top-k", type=int, default=24,
                      help="Images in the report's top-losses gallery (default 24).")
  parser.add_argument("--bins", type=common.positive_int, default=10,
                      help="Confidence bins for the calibration error (default 10).")
  parser.add_argument("--batch-size", type=common.positive_int, default=None,
                      help="Images per model call (default: the training's batch size).")
  parser.add_argument("--workers", type=int, default=0,
                      help="Decode threads (default 0: the training's data.workers, or "
                           "one per CPU core).")
  parser.add_argument("--tfds-data-dir", default=None, metavar="DIR",
                      help="Where TFDS sets are kept (default: the training's).")
  parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
  common.add_cache_flags(parser)
  return parser


def _check_writable(folder: str) -> None:
  """Fails before any work when the report folder cannot be written."""
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):
      pass
  except OSError as e:
    raise common.UsageError(
        f"cannot write --report '{folder}' ({e.strerror or e}); choose a writable "
        "folder.") from None


def _print_text(result) -> None:
  from jaxcls import report
  evaluation = result.evaluation
  what = result.data + (f" split {result.split}" if result.split else "")
  print(f"{what}: {len(evaluation.labels)} images, accuracy {evaluation.accuracy:.4f}, "
        f"loss {evaluation.loss:.4f}, {len(result.skipped)} file(s) skipped")
  print(report.format_table(result.scores))


def _evaluate(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  if args.top_k < 0:
    raise common.UsageError(f"--top-k={args.top_k}; use 0 or more.")
  if args.report is not None:
    _check_writable(args.report)
  common.enable_compilation_cache(args.compilation_cache, args.no_compilation_cache)
  from jaxcls import evaluate
  result = evaluate.evaluate(
      args.workdir, args.data, split=args.split, step=args.step, weights=args.weights,
      batch_size=args.batch_size, workers=args.workers, tfds_data_dir=args.tfds_data_dir,
      cache_dir=args.report, progress=not args.no_progress)
  print(f"Evaluated {result.checkpoint} from {args.workdir}", file=sys.stderr)
  for row in result.skipped:
    print(f"skipped: {row['path']}: {row['reason']}", file=sys.stderr)
  summary = None
  if args.report is not None:
    summary = evaluate.write_report(result, args.report, top_k=args.top_k, bins=args.bins)
  if args.json:
    print(json.dumps({**result.to_json(),
                      "report_dir": summary["report_dir"] if summary else None}))
  else:
    _print_text(result)
    if summary:
      print(summary["report_dir"])
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  common.configure_process()
  return common.run(lambda: _evaluate(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
