"""How fast the train step is, and how close it comes to what the machine can do.

    jaxcls-benchmark step --config configs/catdog.py [--steps 10] \
        [--no-augment] [--config.model.name=resnet18 --config.batch_size=32 ...]

Prints one JSON object: the first step's compile time, XLA's FLOPs per image of the
whole compiled train step (augmentation, forward, backward, optimizer; a multiply-add
counts as two), step images/sec (median of timed steps on synthetic uint8 batches, so
decoding is not in it), the achieved GFLOP/s, the machine's float32 matmul peak measured
in the same run, and the percent of that peak. The step is the one training runs
(`jaxcls.train.pmapped_train_step`), on all local devices. `cpu_fast_convolutions`
says whether the compiled step calls oneDNN's convolutions (`jaxcls.cpu`): read from
the compiled program, so it holds for any model, a user's own included.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcls.cli import common

try:
  from jaxcls import cpu
except ImportError:  # jaxcls without its CPU layers (docs/cpu.md): XLA's step is measured.
  cpu = None


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
  config.augment.crop_area = (1.0, 1.0)
  config.augment.policy = "none"
  config.augment.mixup_alpha = config.augment.cutmix_alpha = 0.0
  return config


def _synthetic_batch(config, devices, num_classes: int) -> dict:
  """A batch shaped as the loader makes them (mask included, so that the step compiled
  for it also takes the loader's batches), already on the devices."""
  from jaxcls import parallel
  size, batch_size = config.data.image_size, config.batch_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
           "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
           "mask": np.ones((batch_size,), bool)}
  return jax.device_put(parallel.shard(batch, len(devices)),
                        parallel.device_sharding(devices))


def _initial_state(config, num_classes: int, devices):
  """(replicated train state, replicated step key) for `config`, as training starts
  them."""
  from jaxcls import parallel, steps
  from jaxcls.models import create_model
  model = create_model(config.model, num_classes, axis_name=parallel.AXIS)
  init_rng, step_rng = jax.random.split(steps.root_key(config.seed))
  state = steps.create_train_state(config, model, init_rng, steps_per_epoch=1000)
  return parallel.replicate(state, devices), parallel.replicate(step_rng, devices)


@dataclasses.dataclass
class CompiledStep:
  """The train step compiled once, with the live state it updates (donated each call)."""
  config: ml_collections.ConfigDict
  devices: list
  compiled: Any
  state: Any
  rng: jax.Array
  batch: dict  # The synthetic batch, on the devices.
  init_s: float
  compile_s: float
  flops: float | None  # Per device and step.
  fast_convolutions: bool

  def __call__(self, batch) -> dict:
    self.state, metrics = self.compiled(self.state, batch, self.rng)
    return metrics


def compile_train_step(config: ml_collections.ConfigDict, *, augment: bool = True,
                       num_classes: int = 2, devices=None) -> CompiledStep:
  """The training step for `config` (`jaxcls.train.pmapped_train_step`), compiled once."""
  from jaxcls import train
  from jaxcls.steps import compiled_flops
  if not augment:
    config = _no_augmentation(config)
  devices = list(devices or jax.local_devices())
  start = time.perf_counter()
  state, step_rng = _initial_state(config, num_classes, devices)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  batch = _synthetic_batch(config, devices, num_classes)
  # With train.progressive_sizes, the step of the last stage (the flagship's only one):
  # batches come at data.image_size and are resized on the device, as in training.
  train_step = functools.partial(train.pmapped_train_step, config, devices,
                                 image_size=train.training_size(config,
                                                                config.num_epochs - 1))
  start = time.perf_counter()
  compiled = train_step().lower(state, batch, step_rng).compile()
  compile_s = time.perf_counter() - start
  fast_convolutions = cpu is not None and cpu.fast_convolutions_in(compiled.as_text())
  flops = compiled_flops(compiled)
  if fast_convolutions:
    # XLA counts nothing for oneDNN's convolutions (custom calls): count the same step
    # compiled with XLA's convolutions. (The lowered program's count is not a substitute:
    # XLA's optimizations move it by 1-2 %.)
    with cpu.disabled():
      flops = compiled_flops(
          train_step().lower(state, batch, step_rng).compile())  # Built without oneDNN.
  return CompiledStep(config, devices, compiled, state, step_rng, batch, init_s, compile_s,
                      flops, fast_convolutions)


def measure_train_step(config: ml_collections.ConfigDict, *, steps: int = 10,
                       warmup: int = 2, augment: bool = True, num_classes: int = 2,
                       devices=None) -> dict:
  """Compile time, FLOPs per image and images/sec of the training step for `config`.

  Returns a dict with, among others: `compile_s` (lowering + XLA compilation of the
  first step; small when the persistent compilation cache already holds it), `init_s`,
  `step_flops_per_image`, `step_images_per_sec` (median over `steps` timed steps after
  `warmup`), `step_ms_median`/`step_ms_min`, `step_cpu_s_median`, `achieved_gflops`,
  `loss_finite` and `cpu_fast_convolutions` (whether oneDNN's convolutions ran).
  """
  step = compile_train_step(config, augment=augment, num_classes=num_classes,
                            devices=devices)
  return time_train_step(step, steps=steps, warmup=warmup, augment=augment)


def time_train_step(step: CompiledStep, *, steps: int = 10, warmup: int = 2,
                    augment: bool = True) -> dict:
  """`measure_train_step`'s figures for a step already compiled (its synthetic batch)."""
  from jaxcls import train
  config, devices = step.config, step.devices
  per_device = config.batch_size // len(devices)
  times, cpu_times = [], []
  for i in range(warmup + steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = step(step.batch)
    jax.block_until_ready((step.state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  step_s = statistics.median(times)
  result = {
      "model": config.model.name, "image_size": config.data.image_size,
      "train_image_size": train.training_size(config, config.num_epochs - 1),
      "batch_size": config.batch_size, "dtype": config.model.dtype,
      "devices": len(devices), "platform": devices[0].platform, "augment": augment,
      "init_s": round(step.init_s, 3), "compile_s": round(step.compile_s, 3),
      "steps_timed": steps, "step_ms_median": round(step_s * 1e3, 2),
      "step_ms_min": round(min(times) * 1e3, 2),
      # CPU seconds of this process per step (all threads): on a machine shared with
      # other jobs, less sensitive to their load than the wall-clock figures.
      "step_cpu_s_median": round(statistics.median(cpu_times), 3),
      "step_images_per_sec": round(config.batch_size / step_s, 2),
      "step_flops_per_image": None if step.flops is None else step.flops / per_device,
      "achieved_gflops": None,
      "loss_finite": bool(np.isfinite(np.asarray(metrics["loss"])).all()),
      "cpu_fast_convolutions": step.fast_convolutions,
  }
  if step.flops is not None:
    # Every device runs the per-device program at the same time.
    result["achieved_gflops"] = round(step.flops * len(devices) / step_s / 1e9, 2)
  return result


def measure_loader_steps(step: CompiledStep, source: str, *, steps: int = 20,
                         workdir: str | None = None) -> dict:
  """Images/sec of the compiled step fed by the real loader (decode, resize, prefetch)
  from `source` (e.g. "folder:PATH" of photo-sized JPEGs).

  The pipeline starts after the step is compiled and the clock starts with it: every
  timed batch is decoded inside the timed window, none while compiling. Also the
  pipeline alone (`host_images_per_sec`: as fast as the host can decode on its usable
  CPUs) and the time to its first batch. To compare with `time_train_step`'s figure:
  equal when decoding keeps up with the devices.
  """
  from jaxcls import parallel
  from jaxcls.data import loader, sources
  config = copy.deepcopy(step.config)
  config.data.source = source
  workers = sources.worker_count(config.data.workers)
  dataset = sources.build_dataset(config.data, config.seed, workdir, workers)

  def host_batches(seed: int):
    return loader.train_batches(
        dataset.train, batch_size=config.batch_size, image_size=config.data.image_size,
        seed=seed, num_steps=steps, workers=workers)

  start = time.perf_counter()
  for _ in host_batches(seed=1):  # Another order than the timed run's: nothing cached.
    pass
  host_s = time.perf_counter() - start
  start = time.perf_counter()
  batches = parallel.prefetch_to_devices(host_batches(seed=config.seed), step.devices)
  metrics = step(next(batches))
  first_batch_s = time.perf_counter() - start
  for batch in batches:
    metrics = step(batch)
  jax.block_until_ready((step.state, metrics))
  elapsed = time.perf_counter() - start
  return {"loader_steps_timed": steps, "loader_workers": workers,
          "loader_images_per_sec": round(steps * config.batch_size / elapsed, 2),
          "loader_first_step_s": round(first_batch_s, 3),
          "host_images_per_sec": round(steps * config.batch_size / host_s, 2),
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
  # switched huge pages on (jaxcls/cpu/allocator.py), or whatever the user set.
  result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
  status = cpu.status() if cpu is not None else {
      "cpu_layers": False, "onednn_unavailable": "jaxcls.cpu is not installed"}
  result["cpu_layers"] = status["cpu_layers"]  # jaxcls.cpu's layers in the step.
  if not result["cpu_fast_convolutions"] and "onednn_unavailable" in status:
    result["cpu_fast_convolutions_unavailable"] = status["onednn_unavailable"]
  result["jax_version"] = jax.__version__
  return result


def build_parser() -> common.Parser:
  parser = common.Parser(
      prog="jaxcls-benchmark step", description=__doc__.split("\n\n")[0],
      epilog="Any --config.KEY=VALUE overrides the recipe, as in training.")
  common.add_config_flag(parser)
  parser.add_argument("--steps", type=common.positive_int, default=10,
                      help="Timed steps (default 10).")
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
  args, overrides = common.parse(build_parser(), argv)
  config = common.load_config(args.config, overrides)
  if args.compilation_cache:
    common.enable_compilation_cache(args.compilation_cache)
  result = benchmark(config, steps=args.steps, warmup=args.warmup,
                     augment=not args.no_augment, matmul_size=args.matmul_size)
  print(json.dumps(result))
  return result


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxcls-benchmark step ARGS`."""
  return common.run(lambda: run([] if argv is None else argv) and 0)
