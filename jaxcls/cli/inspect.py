"""Look at the data before training on it: counts, splits, skipped files and a grid.

    jaxcls-inspect --config configs/catdog.py [--config.KEY=VALUE ...] --out grid.png \
        [--workdir DIR] [--num 16]
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
      prog="jaxcls-inspect",
      description="Counts per class and split, skipped files, and a grid of augmented "
                  "training examples, before training.")
  common.add_config_flag(parser)
  parser.add_argument("--out", default="grid.png", help="Where to write the grid.")
  parser.add_argument("--workdir", default=None,
                      help="Where the verification cache and skipped_files.jsonl go "
                           "(default: a new temporary folder). Give the training workdir "
                           "to reuse its cache.")
  parser.add_argument("--num", type=common.positive_int, default=16,
                      help="How many training examples to draw (default 16).")
  return parser


def _inspect(argv) -> int:
  args, overrides = common.parse(build_parser(), argv)
  config = common.load_config(args.config, overrides)
  from jaxcls import config as config_lib
  from jaxcls.data import inspect, sources
  config_lib.validate(config)
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxcls-inspect-")
  os.makedirs(workdir, exist_ok=True)
  dataset = sources.build_dataset(config.data, config.seed, workdir)
  summary = inspect.summarize(dataset, workdir)
  images, labels = inspect.augmented_examples(dataset, config, args.num)
  inspect.write_grid(images, labels, dataset.class_names, args.out)
  summary["grid"] = os.path.abspath(args.out)
  print(json.dumps(summary, indent=2))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  common.configure_process()
  return common.run(lambda: _inspect(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
