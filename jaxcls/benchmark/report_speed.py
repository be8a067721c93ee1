"""How long `jaxcls-report` takes for a few thousand validation images on a CPU.

    jaxcls-benchmark report-speed [--per-class 1250] [--image-size 64] [--workdir DIR]

Trains the demo recipe for one epoch on generated shapes with 80 % of the images held
out for validation (so the report has thousands to evaluate), then times the report:
the evaluation pass (decode → preprocess → model, as training evaluates) and the rest
(figures, thumbnails, HTML). Prints the figures; asserts nothing.
"""

import logging
import os
import tempfile
import time

from jaxcls.benchmark import REPO_ROOT
from jaxcls.cli import common


def main(argv=None) -> int:
  parser = common.Parser(prog="jaxcls-benchmark report-speed",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--per-class", type=int, default=1250)
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)
  import jax
  from jaxcls import report, train

  config = common.load_config(os.path.join(REPO_ROOT, "configs", "demo.py"))
  config.data.generated_per_class = args.per_class
  config.data.image_size = args.image_size
  config.data.val_fraction = 0.8
  config.num_epochs = 1
  config.train.progress_bar = False
  config.train.log_images = 0
  workdir = args.workdir or tempfile.mkdtemp(prefix="report_speed_")
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  print(f"setup: trained 1 epoch in {time.perf_counter() - start:.1f} s "
        f"({jax.device_count()} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} cores)")

  start = time.perf_counter()
  evaluation, _ = report.load_validation(workdir, progress=False)
  evaluated = time.perf_counter() - start
  start = time.perf_counter()
  summary = report.build_report(workdir, progress=False)
  total = time.perf_counter() - start
  count = summary["count"]
  print(f"evaluation pass alone: {count} images at {args.image_size} px in "
        f"{evaluated:.1f} s ({count / evaluated:.0f} images/s, first call incl. compile)")
  print(f"whole report (2nd evaluation + figures + HTML): {total:.1f} s; "
        f"accuracy {summary['accuracy']:.4f}, ECE {summary['ece']:.4f}")
  print(summary["report_dir"])
  return 0
