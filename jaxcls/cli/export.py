"""Write a trained model as a file that runs without jaxcls.

    jaxcls-export --workdir DIR --out model.jaxexport [--step N] [--tta]
        [--platforms cpu,cuda]

The file and its metadata are described in `jaxcls/serve/export.py`; after writing, the
file is loaded back and compared with the Predictor on random images.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from jaxcls.cli import common

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda")


def build_parser() -> common.Parser:
  parser = common.Parser(
      prog="jaxcls-export",
      description="Write a trained model as a jax.export file that runs without jaxcls.")
  parser.add_argument("--workdir", required=True, help="The training run's workdir.")
  parser.add_argument("--out", required=True, help="Output file, e.g. model.jaxexport.")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step to export.")
  parser.add_argument("--tta", action="store_true",
                      help="Bake in test-time augmentation (average with the mirror).")
  parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                      help="Comma-separated platforms the file runs on: "
                           f"{', '.join(PLATFORMS)} (default {','.join(DEFAULT_PLATFORMS)}).")
  return parser


def _export(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise common.UsageError(f"--platforms '{args.platforms}': unknown "
                            f"{unknown or 'empty list'}; choose from {', '.join(PLATFORMS)}.")
  import jax
  from jaxcls.serve import Predictor, export
  predictor = Predictor.from_workdir(args.workdir, step=args.step)
  exported = export.export_predictor(predictor, tta=args.tta, platforms=platforms)
  meta = export.metadata(predictor, exported, workdir=args.workdir, tta=args.tta)
  try:
    model_path, meta_path = export.write(exported, meta, args.out)
  except OSError as e:
    raise common.UsageError(f"cannot write '{args.out}' ({e.strerror or e}).") from None
  difference = (export.check(predictor, exported, tta=args.tta)
                if export.runs_here(platforms) else None)
  size = os.path.getsize(model_path)
  print(f"Wrote {model_path} ({size / 1e6:.2f} MB, platforms {', '.join(platforms)}, "
        f"step {predictor.step}) and {meta_path}.")
  if difference is None:
    print(f"Not checked: this machine's backend ({jax.default_backend()}) is not among "
          "the platforms.")
  else:
    print(f"Checked: largest difference from the Predictor's probabilities on random "
          f"images is {difference:.2g}.")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  common.configure_process()
  return common.run(lambda: _export(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
