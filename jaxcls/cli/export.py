"""Write a trained model as a file that runs without jaxcls.

    jaxcls-export --workdir DIR --out model.jaxexport [--step N] [--tta]
        [--platforms cpu,cuda]
    jaxcls-export --workdir DIR --format onnx --out model.onnx [--step N] [--tta]

The files are described in `jaxcls/serve/export.py` (jax.export, the default) and
`jaxcls/serve/onnx_export.py` (ONNX); after writing, the file is loaded back and compared
with the Predictor on random images (the ONNX file in ONNX Runtime).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from jaxcls.cli import common

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# jaxcls.serve.export.DEFAULT_PLATFORMS, restated so that --help imports no JAX (a test
# keeps the two equal).
DEFAULT_PLATFORMS = ("cpu", "cuda")
FORMATS = ("jax", "onnx")


def build_parser() -> common.Parser:
  parser = common.Parser(
      prog="jaxcls-export",
      description="Write a trained model as a jax.export or ONNX file that runs without "
                  "jaxcls.")
  parser.add_argument("--workdir", required=True, help="The training run's workdir.")
  parser.add_argument("--out", required=True,
                      help="Output file, e.g. model.jaxexport or model.onnx.")
  parser.add_argument("--format", choices=FORMATS, default="jax",
                      help="jax: a jax.export file and its .json (default); onnx: one "
                           "ONNX file with its metadata inside (needs jaxcls[onnx]).")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step to export.")
  common.add_weights_flag(parser)
  parser.add_argument("--tta", action="store_true",
                      help="Bake in test-time augmentation (average with the mirror).")
  parser.add_argument("--platforms", default=None,
                      help="--format jax only: comma-separated platforms the file runs "
                           f"on: {', '.join(PLATFORMS)} (default "
                           f"{','.join(DEFAULT_PLATFORMS)}).")
  return parser


def _platforms(text: str | None) -> tuple[str, ...]:
  if text is None:
    return DEFAULT_PLATFORMS
  platforms = tuple(p.strip() for p in text.split(",") if p.strip())
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise common.UsageError(f"--platforms '{text}': unknown "
                            f"{unknown or 'empty list'}; choose from {', '.join(PLATFORMS)}.")
  return platforms


def _write_jax_export(args, predictor) -> None:
  import jax
  from jaxcls.serve import export
  platforms = _platforms(args.platforms)
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


def _write_onnx(args, predictor) -> None:
  try:
    from jaxcls.serve import onnx_export
  except ImportError as e:
    raise common.UsageError(f"--format onnx needs the onnx and onnxruntime packages "
                            f"({e}); pip install 'jaxcls[onnx]'.") from None
  model = onnx_export.export_predictor(predictor, tta=args.tta)
  onnx_export.attach_metadata(model, onnx_export.metadata(
      predictor, workdir=args.workdir, tta=args.tta))
  try:
    path = onnx_export.write(model, args.out)
  except OSError as e:
    raise common.UsageError(f"cannot write '{args.out}' ({e.strerror or e}).") from None
  difference = onnx_export.check(predictor, model, tta=args.tta)
  print(f"Wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, ONNX opset "
        f"{onnx_export.jaxpr_to_onnx.OPSET}, step {predictor.step}).")
  print("Checked in ONNX Runtime: largest difference from the Predictor's probabilities "
        f"on random images is {difference:.2g}; labels equal.")


def _export(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  if args.format == "onnx" and args.platforms is not None:
    raise common.UsageError("--platforms applies to --format jax only; an ONNX file runs "
                            "wherever ONNX Runtime does.")
  _platforms(args.platforms)  # Bad flags fail before the checkpoint loads.
  from jaxcls.serve import Predictor
  predictor = Predictor.from_workdir(args.workdir, step=args.step, weights=args.weights)
  if args.format == "onnx":
    _write_onnx(args, predictor)
  else:
    _write_jax_export(args, predictor)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  common.configure_process()
  return common.run(lambda: _export(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
