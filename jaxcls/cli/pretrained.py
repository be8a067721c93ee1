"""Convert published weights into a jaxcls workdir.

    jaxcls-pretrained import --weights hf-hub:timm/resnet50.tv2_in1k --out DIR
    jaxcls-pretrained import --weights torchvision:resnet50 --out DIR
    jaxcls-pretrained import --arch resnet50 --weights resnet50.pth --out DIR
"""

from __future__ import annotations

import sys
from typing import Sequence

from jaxcls.cli import common


def build_parser() -> common.Parser:
  from jaxcls.pretrained.names import LAYOUTS
  parser = common.Parser(prog="jaxcls-pretrained",
                         description="Pretrained weights for jaxcls.")
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser(
      "import", help="Convert torchvision/timm ResNet or timm ConvNeXt weights into a "
      "jaxcls workdir.")
  imp.add_argument(
      "--weights", required=True, metavar="SOURCE",
      help="hf-hub:REPO (timm's safetensors on the Hugging Face hub, e.g. "
           "hf-hub:timm/resnet50.tv2_in1k; cached under HF_HOME), torchvision:ARCH[.WEIGHTS] "
           "(torchvision's release file, e.g. torchvision:resnet50; cached under "
           "TORCH_HOME/hub/checkpoints), or a local .pth/.pt/.bin or .safetensors file.")
  imp.add_argument("--arch", default=None, choices=sorted(LAYOUTS),
                   help="The architecture of a local file (published weights say it).")
  imp.add_argument("--out", required=True, help="New workdir to write.")
  imp.add_argument("--classes", default=None,
                   help="Text file: one class name per line (default: the publisher's, "
                        "ImageNet's for ImageNet weights; 0, 1, ... for a local file).")
  imp.add_argument("--image-size", type=common.positive_int, default=None,
                   help="The image size the model will be given (default: the "
                        "publisher's evaluation size, else 224).")
  return parser


def _import(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  common.setup_logging()  # jaxcls's own lines: which cache, what is downloaded.
  # huggingface_hub warns on each retry of an unreachable hub; the one error line that
  # follows says what happened and what to do.
  from huggingface_hub.utils import logging as hub_logging
  hub_logging.set_verbosity_error()
  from jaxcls import pretrained
  out = pretrained.import_weights(args.arch, args.weights, args.out, args.classes,
                                  args.image_size)
  print(f"Wrote {out}. Check it: jaxcls-predict --workdir {out} IMAGE; "
        f"fine-tune from it: --config.init_from={out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  common.configure_process()
  return common.run(lambda: _import(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
