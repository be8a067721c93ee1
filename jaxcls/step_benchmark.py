"""How fast the train step is, and how close it comes to what the machine can do.

    python -m jaxcls.benchmark step --config configs/catdog.py [--steps 10] \
        [--no-augment] [--config.model.name=resnet18 --config.batch_size=32 ...]

Prints one JSON object: the first step's compile time, XLA's FLOPs per image of the
whole compiled train step (augmentation, forward, backward, optimizer; a multiply-add
counts as two), step images/sec (median of timed steps on synthetic uint8 batches, so
decoding is not in it), the achieved GFLOP/s, the machine's float32 matmul peak measured
in the same run, and the percent of that peak. The step is the one training runs
(`jaxcls.train._pmap_train_step`: pmapped, state donated), on all local devices.

Each figure comes from a function returning a dict, so `jaxcls.benchmark` can report
them next to the loader's figures.
"""

from __future__ import annotations

if __name__ == "__main__":  # Command line: tune the allocator before JAX loads.
  from jaxcls import _launch
  _launch.reexec_with_tuned_allocator()

import argparse
import ast
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`get_config()` of a recipe file, with `KEY=VALUE` overrides (Python literals)."""
  spec = importlib.util.spec_from_file_location("_jaxcls_recipe", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"Cannot load the recipe '{path}': pass a configs/*.py file.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"Override '{item}' has no '='; write it as KEY=VALUE, e.g. "
                       "model.name=resnet18.")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    target = config
    *parents, leaf = key.split(".")
    for part in parents:
      target = target[part]
    if isinstance(target[leaf], float) and isinstance(value, int):
      value = float(value)
    target[leaf] = value
  return config


def matmul_peak(size: int = 2048, repeats: int = 5, dtype=jnp.float32) -> dict:
  """The best float32 GFLOP/s of one large jitted matmul on the default device.

  The reference the train step is measured against: what XLA reaches on this machine,
  measured in the same run, so a busy or throttled machine lowers both figures.
  """
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return {"matmul_size": size, "matmul_dtype": jnp.dtype(dtype).name,
          "matmul_peak_gflops": 2 * size ** 3 / min(times) / 1e9}


def _no_augmentation(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = copy.deepcopy(config)
  config.augment.flip = False
  config.augment.rotation = 0.0
  config.augment.scale = (1.0, 1.0)
  return config


def _synthetic_batch(config, devices, num_classes: int) -> dict:
  from jaxcls.data import loader
  size, batch_size = config.data.image_size, config.batch_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
           "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32)}
  return jax.device_put(loader.shard(batch, len(devices)), loader.device_sharding(devices))


def _step_flops(stage) -> float | None:
  """XLA's FLOP count of a lowered or compiled program."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def measure_train_step(config: ml_collections.ConfigDict, *, steps: int = 10,
                       warmup: int = 2, augment: bool = True, num_classes: int = 2,
                       devices=None) -> dict:
  """Compile time, FLOPs per image and images/sec of the training step for `config`.

  Returns a dict: `compile_s` (lowering + XLA compilation of the first step; small when
  the persistent compilation cache already holds it), `init_s`, `step_flops_per_image`,
  `step_images_per_sec` (median over `steps` timed steps after `warmup`),
  `step_ms_median`, `achieved_gflops`.
  """
  from jaxcls import train
  from jaxcls.models import create_model, onednn
  if not augment:
    config = _no_augmentation(config)
  devices = list(devices or jax.local_devices())
  start = time.perf_counter()
  model = create_model(config.model, num_classes, axis_name=train.AXIS)
  init_rng, step_rng = jax.random.split(train.root_key(config.seed))
  state = train.create_train_state(config, model, init_rng, steps_per_epoch=1000)
  state = train.replicate(state, devices)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  batch = _synthetic_batch(config, devices, num_classes)
  p_step = train._pmap_train_step(config, devices, freeze_backbone=False)
  start = time.perf_counter()
  compiled = p_step.lower(state, batch, step_rng).compile()
  compile_s = time.perf_counter() - start
  flops = _step_flops(compiled)
  if "jaxcls_onednn_conv_" in compiled.as_text():
    # XLA counts nothing for oneDNN's convolutions (custom calls). Count the same step
    # with XLA's convolutions, as lowered (before XLA's optimizations, which moved the
    # count by under 1 % for the CNN and ResNet-18).
    with onednn.disabled():
      flops = _step_flops(train._pmap_train_step(config, devices, freeze_backbone=False)
                          .lower(state, batch, step_rng))
  per_device = config.batch_size // len(devices)
  times, cpu_times = [], []
  for i in range(warmup + steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch, step_rng)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  step_s = statistics.median(times)
  images_per_sec = config.batch_size / step_s
  result = {
      "model": config.model.name, "image_size": config.data.image_size,
      "batch_size": config.batch_size, "dtype": config.model.dtype,
      "devices": len(devices), "platform": devices[0].platform, "augment": augment,
      "init_s": round(init_s, 3), "compile_s": round(compile_s, 3),
      "steps_timed": steps, "step_ms_median": round(step_s * 1e3, 2),
      "step_ms_min": round(min(times) * 1e3, 2),
      # CPU seconds of this process per step (all threads): on a machine shared with
      # other jobs, less sensitive to their load than the wall-clock figures.
      "step_cpu_s_median": round(statistics.median(cpu_times), 3),
      "step_images_per_sec": round(images_per_sec, 2),
      "step_flops_per_image": None if flops is None else flops / per_device,
      "achieved_gflops": None,
      "loss_finite": bool(np.isfinite(np.asarray(metrics["loss"])).all()),
  }
  if flops is not None:
    # Every device runs the per-device program at the same time.
    result["achieved_gflops"] = round(flops * len(devices) / step_s / 1e9, 2)
  return result


def measure_loader_steps(config: ml_collections.ConfigDict, *, steps: int = 20,
                         warmup: int = 3, workdir: str | None = None,
                         devices=None) -> dict:
  """Images/sec of training steps fed by the real loader (decode, resize, prefetch).

  `config.data.source` names the images (e.g. a folder of JPEGs). The figure to compare
  with `measure_train_step`'s: equal when decoding keeps up with the devices.
  """
  from jaxcls import train
  from jaxcls.data import loader, sources
  from jaxcls.models import create_model
  devices = list(devices or jax.local_devices())
  workers = train._workers(config)
  dataset = sources.build_dataset(config.data, config.seed, workdir, workers)
  model = create_model(config.model, len(dataset.class_names), axis_name=train.AXIS)
  init_rng, step_rng = jax.random.split(train.root_key(config.seed))
  state = train.replicate(
      train.create_train_state(config, model, init_rng, steps_per_epoch=1000), devices)
  p_step = train._pmap_train_step(config, devices, freeze_backbone=False)
  batches = loader.prefetch_to_devices(loader.train_batches(
      dataset.train, batch_size=config.batch_size, image_size=config.data.image_size,
      seed=config.seed, num_steps=warmup + steps, workers=workers), devices)
  for _ in range(warmup):
    state, metrics = p_step(state, next(batches), step_rng)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = p_step(state, next(batches), step_rng)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - start
  return {"loader_steps_timed": steps, "loader_workers": workers,
          "loader_images_per_sec": round(steps * config.batch_size / elapsed, 2),
          "loader_train_images": len(dataset.train)}


def benchmark(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
              augment: bool = True, matmul_size: int = 2048) -> dict:
  """The train step's figures plus the matmul peak and the percent of it reached."""
  result = measure_train_step(config, steps=steps, warmup=warmup, augment=augment)
  result.update(matmul_peak(matmul_size))
  result["matmul_peak_gflops"] = round(result["matmul_peak_gflops"], 2)
  if result["achieved_gflops"] is not None:
    result["percent_of_peak"] = round(
        100 * result["achieved_gflops"] / result["matmul_peak_gflops"], 1)
  result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  # The GLIBC_TUNABLES in force: glibc.malloc.hugetlb=1 among them when the command line
  # switched huge pages on (jaxcls/_launch.py), or whatever the user set.
  result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
  from jaxcls.models import layers, onednn
  # jaxcls's batch norm, max pool and convolution in use.
  result["cpu_layers"] = layers.fast_cpu_ops()
  # The convolutions run by oneDNN (else by XLA), and why not where they are not.
  result["onednn_convolutions"] = result["cpu_layers"] and onednn.available()
  if result["cpu_layers"] and not result["onednn_convolutions"]:
    result["onednn_unavailable"] = onednn.unavailable_reason()
  result["jax_version"] = jax.__version__
  return result


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m jaxcls.step_benchmark", description=__doc__.split("\n\n")[0],
      epilog="Any --config.KEY=VALUE overrides the recipe, as in training.")
  parser.add_argument("--config", required=True, help="Recipe file (configs/*.py).")
  parser.add_argument("--steps", type=int, default=10, help="Timed steps (default 10).")
  parser.add_argument("--warmup", type=int, default=2, help="Untimed steps (default 2).")
  parser.add_argument("--no-augment", action="store_true",
                      help="Turn augmentation off, to see what it costs.")
  parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                      help="Use JAX's persistent compilation cache in DIR (a second run "
                           "then shows the warm compile time).")
  parser.add_argument("--matmul-size", type=int, default=2048)
  return parser


def run(argv: Sequence[str]) -> dict:
  """Parses the command line, measures, prints and returns the JSON figures."""
  argv = list(argv)
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  if args.steps < 1:
    raise SystemExit(f"error: --steps={args.steps}; it must be at least 1.")
  if args.compilation_cache:
    from jaxcls.predict import enable_compilation_cache
    enable_compilation_cache(args.compilation_cache)
  config = load_config(args.config, overrides)
  result = benchmark(config, steps=args.steps, warmup=args.warmup,
                     augment=not args.no_augment, matmul_size=args.matmul_size)
  print(json.dumps(result))
  return result


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m jaxcls.step_benchmark ARGS` or `python -m jaxcls.benchmark step ARGS`."""
  run(sys.argv[1:] if argv is None else argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
