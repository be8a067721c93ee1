"""Throughput figures: does the input pipeline keep up with the train step?

    jaxcls-benchmark loader --config configs/catdog.py \
        --config.data.image_size=160 --jpegs 300 [--steps 20] [--workers 1,2] \
        [--figures decode,step,loop]

(`jaxcls-benchmark --config ...`, without `loader`, runs it too.)

Prints one JSON object:
- `decode_images_per_sec`: {worker count: images/sec} reading and preprocessing
  (decode, EXIF, RGB, resize) in the loader's worker threads; and
  `decode_images_per_sec_processes`, the same work in a process pool, for comparison;
- `step_images_per_sec`: the pmapped train step on one batch already on the devices;
- `loop_images_per_sec`: the same step fed by the real loader (grain workers, device
  prefetch), as in `train_and_evaluate`;
- `loop_over_step`: their ratio; 1.0 means the input pipeline costs nothing;
- `step_cpu_ms`, `loop_cpu_ms` and `step_cpu_over_loop_cpu`: the process's CPU time per
  step (every thread: XLA's and the decoders'). Wall-clock figures swing when other
  programs share the CPU; CPU time does not, and on a CPU backend whose step keeps every
  core busy, `loop_over_step` tends to `step_cpu_over_loop_cpu`.

`--jpegs N` writes N photo-like 500x375 JPEGs per class into the workdir and uses them
(instead of the config's source), so the figures can be reproduced offline.

Each figure is one function registered in FIGURES: `figure(bench) -> dict`. Another
module adds its own with `register("name")` and is picked with `--figures name`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import os
import tempfile
import time
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from jaxcls.cli import common

FIGURES: dict[str, Callable[["Bench"], dict]] = {}


def register(name: str):
  """Decorator: adds `fn(bench) -> dict` to the figures `--figures` can pick."""
  def wrap(fn):
    FIGURES[name] = fn
    return fn
  return wrap


def write_photo_jpegs(root: str, per_class: int, seed: int = 0,
                      size: tuple[int, int] = (500, 375), quality: int = 85) -> None:
  """Writes cat/ and dog/ folders of photo-like JPEGs (smooth colour fields, edges, grain).

  Their decode cost is like real 500x375 photos: the same pixel count, similar sizes.
  """
  rng = np.random.default_rng(seed)
  width, height = size
  for name in ("cat", "dog"):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      path = os.path.join(root, name, f"{name}.{i}.jpg")
      if os.path.exists(path):
        continue
      coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
      field = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
      pixels = np.asarray(field, np.float32)
      stripes = np.sin(np.arange(width) / rng.uniform(3, 12))[None, :, None] * 25
      pixels = pixels + stripes + rng.normal(0, 10, (height, width, 3))
      Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
          path, format="JPEG", quality=quality)


class Bench:
  """What the figures share: the config, the data set, and the compiled train step."""

  def __init__(self, config, workdir: str, steps: int, worker_counts: list[int],
               decode_images: int):
    self.config, self.workdir, self.steps = config, workdir, steps
    self.worker_counts, self.decode_images = worker_counts, decode_images

  @functools.cached_property
  def dataset(self):
    from jaxcls.data import sources  # pylint: disable=import-outside-toplevel
    return sources.build_dataset(self.config.data, self.config.seed, self.workdir)

  @functools.cached_property
  def devices(self):
    import jax  # pylint: disable=import-outside-toplevel
    return jax.local_devices()

  @functools.cached_property
  def train(self):
    """(pmapped train step, replicated state, rng), compiled once for step and loop."""
    import jax  # pylint: disable=import-outside-toplevel
    from jaxcls import parallel, steps, train  # pylint: disable=import-outside-toplevel
    from jaxcls.models import create_model  # pylint: disable=import-outside-toplevel
    c = self.config
    model = create_model(c.model, len(self.dataset.class_names), axis_name=parallel.AXIS)
    init_rng, step_rng = jax.random.split(steps.root_key(c.seed))
    state = steps.create_train_state(c, model, init_rng,
                                     max(1, len(self.dataset.train) // c.batch_size))
    return (train.pmapped_train_step(c, self.devices),
            parallel.replicate(state, self.devices),
            parallel.replicate(step_rng, self.devices))

  def host_batches(self, num_steps: int, start_step: int = 0):
    from jaxcls.data import loader, sources  # pylint: disable=import-outside-toplevel
    c = self.config
    return loader.train_batches(
        self.dataset.train, batch_size=c.batch_size, image_size=c.data.image_size,
        seed=c.seed, num_steps=num_steps, start_step=start_step,
        workers=sources.worker_count(c.data.workers))


def _decode_indices(source, indices, image_size: int) -> int:
  from jaxcls.data import preprocess  # pylint: disable=import-outside-toplevel
  for index in indices:
    preprocess.load_image(source[int(index)]["data"], image_size)
  return len(indices)


def _rate(pool_map, source, indices, image_size: int, workers: int) -> float:
  chunks = np.array_split(np.asarray(indices), workers * 8)
  start = time.perf_counter()
  done = sum(pool_map(functools.partial(_decode_indices, source, image_size=image_size),
                      chunks))
  return done / (time.perf_counter() - start)


@register("decode")
def decode_figure(bench: Bench) -> dict:
  """Images/sec read + preprocessed per worker count, threads (the loader's) and processes."""
  source = getattr(bench.dataset.train, "source", bench.dataset.train)  # Uncached.
  n = min(bench.decode_images, len(source))
  indices = list(range(n))
  size = bench.config.data.image_size
  _decode_indices(source, indices[:20], size)  # Warm the page cache and imports.
  cpu_start = time.process_time()
  _decode_indices(source, indices[:100], size)
  cpu_ms = 1000 * (time.process_time() - cpu_start) / len(indices[:100])
  threads, processes = {}, {}
  for workers in bench.worker_counts:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      threads[str(workers)] = round(_rate(pool.map, source, indices, size, workers), 1)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      list(pool.map(_decode_indices, [source] * workers, [[0]] * workers,
                    [size] * workers))  # Start every worker before timing.
      processes[str(workers)] = round(_rate(pool.map, source, indices, size, workers), 1)
  return {"decode_images": n, "decode_cpu_ms_per_image": round(cpu_ms, 2),
          "decode_images_per_sec": threads,
          "decode_images_per_sec_processes": processes}


def _block(tree) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(tree)


@register("step")
def step_figure(bench: Bench) -> dict:
  """Images/sec of the train step alone, on one batch that already sits on the devices."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxcls import parallel  # pylint: disable=import-outside-toplevel
  p_step, state, rng = bench.train
  batch = next(bench.host_batches(1))
  on_device = jax.device_put(parallel.shard(batch, len(bench.devices)),
                             parallel.device_sharding(bench.devices))
  for _ in range(2):  # Compile and warm up.
    state, metrics = p_step(state, on_device, rng)
  _block(state)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(bench.steps):
    state, metrics = p_step(state, on_device, rng)
  _block((state, metrics))
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  bench.train = (p_step, state, rng)  # Donated: keep the live state for the next figure.
  return {"step_images_per_sec": round(bench.steps * bench.config.batch_size / seconds, 1),
          "step_ms": round(1000 * seconds / bench.steps, 1),
          "step_cpu_ms": round(1000 * cpu / bench.steps, 1)}


@register("loop")
def loop_figure(bench: Bench) -> dict:
  """Images/sec of the same step fed by the real loader, as in train_and_evaluate.

  With data.cache on, the cache is filled first: the figure is that of later epochs.
  """
  from jaxcls import parallel  # pylint: disable=import-outside-toplevel
  from jaxcls.data import sources  # pylint: disable=import-outside-toplevel
  p_step, state, rng = bench.train
  results = {}
  train_source = bench.dataset.train
  if hasattr(train_source, "num_cached"):  # data.cache: measure later epochs' loop.
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
      list(pool.map(train_source.__getitem__, range(len(train_source))))
    results["cache_fill_sec"] = round(time.perf_counter() - start, 2)
  warmup = 2
  # The loader reads ahead; asking for more batches than are timed keeps it reading
  # ahead at the end as at the start, so the timed window pays for as many batches
  # as it consumes.
  read_ahead = 2 * sources.worker_count(bench.config.data.workers) + 2
  batches = parallel.prefetch_to_devices(
      bench.host_batches(warmup + bench.steps + read_ahead), bench.devices)
  for _ in range(warmup):  # Compile (if step did not) and fill the prefetch buffers.
    state, metrics = p_step(state, next(batches), rng)
  _block(state)
  start, cpu_start = time.perf_counter(), time.process_time()
  pending = []
  for step in range(bench.steps):
    state, metrics = p_step(state, next(batches), rng)
    pending.append(metrics)
    if (step + 1) % bench.config.train.log_every_steps == 0:
      _block(pending)  # The train loop fetches metrics once per log interval.
      pending = []
  _block((state, pending))
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  bench.train = (p_step, state, rng)
  return {**results,
          "loop_images_per_sec": round(bench.steps * bench.config.batch_size / seconds, 1),
          "loop_ms": round(1000 * seconds / bench.steps, 1),
          "loop_cpu_ms": round(1000 * cpu / bench.steps, 1)}


def run_figures(bench: Bench, names: list[str]) -> dict:
  unknown = [n for n in names if n not in FIGURES]
  if unknown:
    raise ValueError(f"Unknown figure(s) {unknown}; choose from {sorted(FIGURES)}.")
  results = {}
  for name in names:
    results.update(FIGURES[name](bench))
  if "step_images_per_sec" in results and "loop_images_per_sec" in results:
    results["loop_over_step"] = round(
        results["loop_images_per_sec"] / results["step_images_per_sec"], 3)
  if "step_cpu_ms" in results and "loop_cpu_ms" in results:
    # CPU time (all threads) per step: robust when other programs share the CPU. On a
    # CPU backend whose step keeps every core busy, loop_over_step tends to this.
    results["step_cpu_over_loop_cpu"] = round(
        results["step_cpu_ms"] / results["loop_cpu_ms"], 3)
  return results


def build_parser() -> common.Parser:
  parser = common.Parser(prog="jaxcls-benchmark loader",
                         description=__doc__.split("\n\n")[0])
  common.add_config_flag(parser)
  parser.add_argument("--workdir", default=None,
                      help="Scratch folder (default: a temporary one).")
  parser.add_argument("--jpegs", type=int, default=0,
                      help="Write this many 500x375 JPEGs per class and benchmark on them "
                           "instead of the config's source.")
  parser.add_argument("--steps", type=common.positive_int, default=20,
                      help="Timed train steps (step and loop).")
  parser.add_argument("--workers", default=None,
                      help="Comma-separated worker counts for the decode figure (default: "
                           "1 up to the CPU count).")
  parser.add_argument("--figures", default="decode,step,loop",
                      help=f"Figures to measure, in order (of {', '.join(sorted(FIGURES))}).")
  parser.add_argument("--decode-images", "--decode_images", type=common.positive_int,
                      default=600, help="Images per decode figure.")
  return parser


def _measure(argv) -> int:
  args, overrides = common.parse(build_parser(), argv)
  from jaxcls import config as config_lib  # pylint: disable=import-outside-toplevel
  config = common.load_config(args.config, overrides)
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxcls-bench-")
  os.makedirs(workdir, exist_ok=True)
  if args.jpegs:
    root = os.path.join(workdir, "jpegs_500x375")
    write_photo_jpegs(root, args.jpegs)
    config.data.source = "folder:" + root
  config_lib.validate(config)
  cpus = os.cpu_count() or 1
  worker_counts = ([int(w) for w in args.workers.split(",")] if args.workers
                   else sorted({1, *range(2, cpus + 1, max(1, cpus // 4))}))
  bench = Bench(config, workdir, args.steps, worker_counts, args.decode_images)
  results = {"config": {"source": config.data.source, "image_size": config.data.image_size,
                        "batch_size": config.batch_size, "model": config.model.name,
                        "widths": list(config.model.widths), "cache": config.data.cache,
                        "workers": config.data.workers or cpus},
             "devices": f"{len(bench.devices)} x {bench.devices[0].device_kind}",
             "cpu_count": cpus, "train_images": len(bench.dataset.train)}
  results.update(run_figures(bench, [f for f in args.figures.split(",") if f]))
  print(json.dumps(results), flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxcls-benchmark loader ARGS`."""
  return common.run(lambda: _measure(argv))
