"""Inference side by side: the Predictor, the jax.export file and ONNX Runtime.

    jaxcls-benchmark inference [--workdir DIR] [--image-size 128]
        [--widths 32,64,128,256] [--batch 64] [--repeats 5]

One model, one set of images, one run: the three engines take turns, round after round,
so a change in the machine's load touches them alike. For each: images/s on a batch of
`--batch` preprocessed images, and the latency of one preprocessed image (median and
90th percentile). Preprocessing is the same function for all three and is timed once on
its own (`decode_images_per_s`, one thread). Also printed: the largest difference of each
engine's probabilities from the Predictor's on the batch.

- `predictor`: `Predictor.predict_arrays` (jit, with jaxcls.cpu's oneDNN layers on CPU);
- `jax_export`: the `jaxcls-export` file, deserialized and called under `jax.jit`;
- `onnxruntime`: the `jaxcls-export --format onnx` file in an ONNX Runtime session
  (CPU, default graph optimizations and threads).

Without --workdir it measures the cats-vs-dogs recipe's model (the CNN with widths
32-64-128-256 at 128 px) with random weights: speed does not depend on the weights.
Images are 500x375 JPEGs, the typical size in the PetImages set. Prints JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from jaxcls.benchmark import predict as predict_benchmark
from jaxcls.cli import common


def engines(predictor) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
  """name → function(uint8 images [N, S, S, 3]) → probabilities [N, C], as numpy."""
  import jax
  from jaxcls.serve import export, onnx_export
  exported = jax.export.deserialize(export.export_predictor(
      predictor, platforms=("cpu",)).serialize())
  call_exported = jax.jit(exported.call)
  session = onnx_export.session(onnx_export.export_predictor(predictor))
  return {
      "predictor": lambda images: predictor.predict_arrays(images)[0],
      "jax_export": lambda images: np.asarray(call_exported(images)),
      "onnxruntime": lambda images: onnx_export.run(session, images)[0],
  }


def _seconds(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def measure(runs: dict[str, Callable], batch: np.ndarray, repeats: int,
            latency_calls: int = 10) -> dict[str, dict]:
  """Per engine: images/s on `batch` (median of `repeats` rounds) and one image's
  latency (median and p90 of `repeats` × `latency_calls` calls), taking turns."""
  one = batch[:1]
  for run in runs.values():  # Compile (or optimize) both shapes before timing.
    run(batch)
    run(one)
  batch_s = {name: [] for name in runs}
  single_s = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      batch_s[name].append(_seconds(lambda: run(batch)))
      single_s[name].extend(_seconds(lambda: run(one)) for _ in range(latency_calls))
  out = {}
  for name in runs:
    ms = sorted(1000 * s for s in single_s[name])
    out[name] = {"images_per_s": len(batch) / statistics.median(batch_s[name]),
                 "latency_ms": statistics.median(ms),
                 "latency_p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))]}
  return out


def differences(runs: dict[str, Callable], batch: np.ndarray) -> dict[str, float]:
  """Largest difference of each engine's probabilities from the Predictor's."""
  reference = runs["predictor"](batch)
  return {name: float(np.max(np.abs(run(batch) - reference)))
          for name, run in runs.items() if name != "predictor"}


def _decode_rate(paths: Sequence[str], image_size: int) -> tuple[np.ndarray, float]:
  from jaxcls.data import preprocess
  start = time.perf_counter()
  images = np.stack([preprocess.load_image(p, image_size) for p in paths])
  return images, len(paths) / (time.perf_counter() - start)


def build_parser() -> common.Parser:
  parser = common.Parser(prog="jaxcls-benchmark inference",
                         description=__doc__.split("\n\n")[0])
  predict_benchmark.add_model_flags(parser)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  return parser


def _measure(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  if args.batch < 1 or args.repeats < 1:
    raise common.UsageError(f"--batch {args.batch} --repeats {args.repeats}: both must "
                            "be at least 1.")
  import jax
  try:
    import onnxruntime
  except ImportError as e:
    raise common.UsageError(f"this benchmark needs ONNX Runtime ({e}); pip install "
                            "'jaxcls[onnx]'.") from None
  from jaxcls.serve import Predictor
  with tempfile.TemporaryDirectory(prefix="jaxcls_inference_bench_") as scratch:
    workdir = predict_benchmark.workdir_or_random(args, scratch)
    predictor = Predictor.from_workdir(workdir, batch_size=args.batch)
    os.makedirs(os.path.join(scratch, "images"))
    paths = predict_benchmark.write_images(os.path.join(scratch, "images"), args.batch)
    batch, decode_rate = _decode_rate(paths, predictor.image_size)
  runs = engines(predictor)
  load_before = os.getloadavg()[0]
  figures = measure(runs, batch, args.repeats)
  backbone = predictor.model.backbone
  print(json.dumps({
      "model": f"{type(backbone).__name__} {tuple(getattr(backbone, 'widths', ()))}",
      "image_size": predictor.image_size, "batch": args.batch, "repeats": args.repeats,
      "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
      "jax_version": jax.__version__, "onnxruntime_version": onnxruntime.__version__,
      "decode_images_per_s": decode_rate,
      # Before and after timing, this run included: on a 2-core machine above 2, other
      # processes share the cores and every wall-clock figure is slower.
      "load_average_1min": [load_before, os.getloadavg()[0]],
      "engines": figures,
      "max_abs_difference_from_predictor": differences(runs, batch),
  }, indent=2))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxcls-benchmark inference ARGS`."""
  return common.run(lambda: _measure(argv))
