"""ResNet-50 at 224 px in bfloat16 on one accelerator: synthetic and real-loader images/sec.

    jaxcls-benchmark gpu [--batch-size 256] [--steps 30] [--images 3000] [--workdir DIR]
    # or: bash benchmarks/gpu.sh

Two figures, printed as one JSON object (each step is the training step jaxcls runs:
on-device augmentation, forward, backward, SGD, state donated):
1. `synthetic`: the step on one batch already on the device (compile time, FLOPs per
   image, images/sec, percent of a bfloat16 matmul's peak measured in the same run, and
   the share of the H200's 989 TFLOP/s dense bfloat16 peak at MLPerf's 24.7 GFLOP per
   ResNet-50 training image);
2. `loader`: the same step fed by the real loader (decode, resize, host→device
   prefetch) from `--images` generated 224 px JPEGs/PNGs written once into WORKDIR.
Sized to finish in well under 5 minutes on one GPU (ResNet-50 compiles in about a
minute; drawing 3,000 images takes about half a minute on a few cores).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from jaxcls.cli import common

H200_DENSE_BF16_FLOPS = 989e12  # NVIDIA's figure for the H200 SXM, without sparsity.
RESNET50_TRAIN_FLOP_PER_IMAGE = 24.7e9  # 3 × ResNet-50's forward pass at 224 px.


def _config(args, source: str = ""):
  from jaxcls.config import base_config
  config = base_config()
  config.model.name = args.model
  config.model.dtype = args.dtype
  config.model.dropout = 0.2
  config.data.image_size = args.image_size
  config.data.val_fraction = 0.1  # Unused here; the split must not be empty.
  config.data.source = source
  config.augment.flip = True
  config.augment.rotation = 10.0
  config.augment.scale = (0.9, 1.1)
  config.batch_size = args.batch_size
  config.optim.learning_rate = 0.1
  return config


def main(argv=None) -> int:
  parser = common.Parser(prog="jaxcls-benchmark gpu",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--model", default="resnet50")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--matmul-size", type=int, default=8192)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--loader-steps", type=int, default=10)
  parser.add_argument("--images", type=int, default=3000,
                      help="Generated images for the loader run (half per class).")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--compilation-cache", default=None, metavar="DIR")
  args = parser.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from jaxcls.benchmark import step as step_benchmark
  if args.compilation_cache:
    common.enable_compilation_cache(args.compilation_cache)
  started = time.perf_counter()
  result = {"device": str(jax.devices()[0].device_kind), "devices": jax.local_device_count(),
            "jax_version": jax.__version__}
  synthetic = step_benchmark.measure_train_step(_config(args),
                                                steps=args.steps, warmup=3,
                                                devices=jax.local_devices()[:1])
  synthetic.update(step_benchmark.matmul_peak(args.matmul_size, dtype=jnp.dtype(args.dtype)))
  if synthetic["achieved_gflops"]:
    synthetic["percent_of_peak"] = round(
        100 * synthetic["achieved_gflops"] / synthetic["matmul_peak_gflops"], 1)
  synthetic["percent_of_h200_dense_bf16_peak"] = round(
      100 * synthetic["step_images_per_sec"] * RESNET50_TRAIN_FLOP_PER_IMAGE
      / H200_DENSE_BF16_FLOPS, 1)
  result["synthetic"] = synthetic
  print(json.dumps({"partial": result}), file=sys.stderr, flush=True)
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxcls_gpu_bench_")
  draw_start = time.perf_counter()
  root = os.path.join(workdir, f"shapes_{args.image_size}px_{args.images}")
  if not os.path.isdir(root):  # Drawn at full size, so decoding costs what it would.
    from jaxcls.data import sources
    sources.draw_shapes(root, args.images // 2, seed=0, size=args.image_size)
  config = _config(args, f"folder:{root}")
  loader = step_benchmark.measure_loader_steps(
      config, steps=args.loader_steps, warmup=2, workdir=workdir,
      devices=jax.local_devices()[:1])
  loader["draw_and_loader_s"] = round(time.perf_counter() - draw_start, 1)
  result["loader"] = loader
  result["total_s"] = round(time.perf_counter() - started, 1)
  print(json.dumps(result))
  return 0
