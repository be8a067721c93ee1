"""How fast predict answers: cold start, warm latency and batch throughput.

    jaxcls-benchmark predict [--workdir DIR] [--image-size 128]
        [--widths 32,64,128,256] [--repeats 3] [--batch 256] [--json]

- cold start: wall time from launching `jaxcls-predict` on one image to its
  first output line, without the persistent compilation cache, with an empty cache (the
  first run, which fills it) and with a filled cache (every later run);
- warm latency: one image through a loaded Predictor, from the file and from an already
  preprocessed array;
- throughput: a batch of `--batch` images, from files (threaded decode + model) and
  from preprocessed arrays (model only).

Without --workdir it measures the cats-vs-dogs recipe's model (the CNN with widths
32-64-128-256 at 128 px) with random weights: speed does not depend on the weights.
Test images are 500x375 JPEGs, the typical size in the PetImages set.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import numpy as np
from PIL import Image

from jaxcls.benchmark import REPO_ROOT, uncached_environment
from jaxcls.cli import common


def write_random_workdir(workdir: str, config, class_names: Sequence[str],
                         step: int = 1) -> None:
  """Writes a checkpoint the way training does, with random weights and no compiling.

  Jitting `model.init` takes 30 s or more on a busy 2-core machine (threefry), so the
  state's structure comes from `jax.eval_shape` and its values from numpy: He-scaled
  kernels, random biases and batch-norm scales, and non-trivial running statistics.
  """
  import jax
  from jaxcls import checkpoint
  from jaxcls import workdir as workdir_lib
  from jaxcls.models import create_model
  from jaxcls.steps import create_train_state
  model = create_model(config.model, len(class_names))
  shapes = jax.eval_shape(
      lambda: create_train_state(config, model, jax.random.key(config.seed), step))
  rng = np.random.default_rng(config.seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      values = rng.normal(0.0, np.sqrt(2.0 / np.prod(x.shape[:-1])), x.shape)
    elif name.endswith("['mean']") or name.endswith("['bias']"):
      values = rng.normal(0.0, 0.3, x.shape)
    elif name.endswith("['var']") or name.endswith("['scale']"):
      values = rng.uniform(0.5, 2.0, x.shape)
    else:
      values = np.zeros(x.shape)
    return np.asarray(values, x.dtype)

  state = jax.tree_util.tree_map_with_path(fill, shapes).replace(step=np.int32(step))
  mngr = checkpoint.manager(workdir)
  workdir_lib.save_checkpoint(mngr, state, workdir_lib.RunMeta(
      config=config.to_dict(), class_names=tuple(class_names), step=step, epoch=1))
  mngr.wait_until_finished()
  mngr.close()


def write_images(folder: str, count: int, size=(500, 375)) -> list[str]:
  rng = np.random.default_rng(0)
  paths = []
  for i in range(count):
    base = rng.integers(0, 256, (1, 1, 3))
    pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255)
    path = os.path.join(folder, f"image_{i:04d}.jpg")
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    paths.append(path)
  return paths


def _children_cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def first_answer(workdir: str, image: str,
                 cache_args: Sequence[str]) -> tuple[float, float]:
  """(wall seconds from launch to the first stdout line, CPU seconds of the whole process)
  for `jaxcls-predict` on one image. CPU time varies less than wall time on a
  machine shared with other work."""
  env = uncached_environment()
  command = [sys.executable, "-m", "jaxcls.cli.predict", "--workdir", workdir, image,
             *cache_args]
  cpu_before = _children_cpu_seconds()
  start = time.perf_counter()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=REPO_ROOT)
  line = proc.stdout.readline()
  seconds = time.perf_counter() - start
  _, err = proc.communicate()
  if proc.returncode != 0 or not line.startswith(image):
    raise RuntimeError(f"predict failed (exit {proc.returncode}): {line}{err[-2000:]}")
  return seconds, _children_cpu_seconds() - cpu_before


def cold_start(workdir: str, image: str, repeats: int, scratch: str) -> dict:
  """Medians over `repeats` launches: no cache, empty cache, filled cache."""
  runs = {"no_cache": [], "empty_cache": [], "warm_cache": []}
  for i in range(repeats):
    cache = ["--compilation-cache", os.path.join(scratch, f"cache_{i}")]
    for name, args in (("no_cache", ["--no-compilation-cache"]), ("empty_cache", cache),
                       ("warm_cache", cache)):
      runs[name].append(first_answer(workdir, image, args))
  out = {"repeats": repeats}
  for name, values in runs.items():
    out[f"{name}_s"] = statistics.median(wall for wall, _ in values)
    out[f"{name}_cpu_s"] = statistics.median(cpu for _, cpu in values)
  return out


def _median_ms(fn, repeats: int) -> tuple[float, float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(1000 * (time.perf_counter() - start))
  times.sort()
  return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def warm_numbers(workdir: str, images: list[str], batch: int, repeats: int) -> dict:
  """Latency for one image and throughput for `batch` images, after compiling."""
  from jaxcls.serve import Predictor
  predictor = Predictor.from_workdir(workdir, batch_size=batch)
  one = [images[0]]
  array = predictor._load(images[0])[None]
  for _ in range(3):  # Compile (batch of 1) and warm up.
    predictor.predict_files(one)
  file_ms, file_p90 = _median_ms(lambda: predictor.predict_files(one), 10 * repeats)
  array_ms, _ = _median_ms(lambda: predictor.predict_arrays(array), 10 * repeats)

  files = images[:batch]
  arrays = np.stack([predictor._load(p) for p in files])
  predictor.predict_arrays(arrays)  # Compile the full batch.
  files_ms, _ = _median_ms(lambda: predictor.predict_files(files), repeats)
  arrays_ms, _ = _median_ms(lambda: predictor.predict_arrays(arrays), repeats)
  return {"latency_file_ms": file_ms, "latency_file_p90_ms": file_p90,
          "latency_array_ms": array_ms, "batch": len(files),
          "throughput_files_per_s": len(files) / (files_ms / 1000),
          "throughput_arrays_per_s": len(files) / (arrays_ms / 1000),
          "decode_threads": os.cpu_count()}


def model_config(image_size: int, widths: tuple[int, ...]):
  from jaxcls.config import base_config
  config = base_config()
  config.data.source = "generated:shapes"
  config.data.image_size = image_size
  config.model.widths = widths
  return config


def add_model_flags(parser: common.Parser) -> None:
  """The flags `workdir_or_random` reads."""
  parser.add_argument("--workdir", default=None,
                      help="A trained workdir (default: the catdog model, random weights).")
  parser.add_argument("--image-size", type=common.positive_int, default=128)
  parser.add_argument("--widths", default="32,64,128,256")


def workdir_or_random(args, scratch: str) -> str:
  """`--workdir`, or a random-weights workdir of the `--widths` CNN at `--image-size`
  written under `scratch` (a benchmark needs speed, not accuracy)."""
  if args.workdir is not None:
    return args.workdir
  workdir = os.path.join(scratch, "workdir")
  widths = tuple(int(w) for w in args.widths.split(","))
  write_random_workdir(workdir, model_config(args.image_size, widths), ("cat", "dog"))
  return workdir


def _report(info: dict, cold: dict | None, warm: dict) -> str:
  lines = [f"predict benchmark: {info['model']}, {info['image_size']} px, "
           f"{info['backend']} ({info['devices']} device(s)), {os.cpu_count()} CPU core(s)"]
  if cold:
    lines += [
        f"cold start, launch to first answer for 1 image (median of {cold['repeats']}; "
        "wall, and CPU time of the process):",
        *(f"  {label:28} {cold[key + '_s']:6.2f} s wall {cold[key + '_cpu_s']:6.2f} s CPU"
          for label, key in (("no compilation cache", "no_cache"),
                             ("empty cache (first run)", "empty_cache"),
                             ("filled cache (later runs)", "warm_cache")))]
  return "\n".join(lines + [
      "warm latency, 1 image:",
      f"  file -> answer               {warm['latency_file_ms']:6.1f} ms "
      f"(p90 {warm['latency_file_p90_ms']:.1f} ms)",
      f"  preprocessed array -> answer {warm['latency_array_ms']:6.1f} ms",
      f"throughput, batch of {warm['batch']}:",
      f"  files (decode + model)       {warm['throughput_files_per_s']:6.1f} images/s "
      f"({warm['decode_threads']} decode threads)",
      f"  preprocessed arrays (model)  {warm['throughput_arrays_per_s']:6.1f} images/s",
  ])


def build_parser() -> common.Parser:
  parser = common.Parser(prog="jaxcls-benchmark predict",
                         description=__doc__.split("\n\n")[0])
  add_model_flags(parser)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--skip-cold", action="store_true", help="Skip the cold-start runs.")
  parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
  return parser


def _measure(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  import jax
  with tempfile.TemporaryDirectory(prefix="jaxcls_predict_bench_") as scratch:
    workdir = workdir_or_random(args, scratch)
    os.makedirs(os.path.join(scratch, "images"))
    images = write_images(os.path.join(scratch, "images"), args.batch)
    cold = (cold_start(workdir, images[0], args.repeats, scratch) if not args.skip_cold
            else None)
    warm = warm_numbers(workdir, images, args.batch, args.repeats)
    from jaxcls.serve import Predictor
    predictor = Predictor.from_workdir(workdir)
    info = {"model": f"{predictor.model.backbone.__class__.__name__} "
                     f"{tuple(getattr(predictor.model.backbone, 'widths', ()))}",
            "image_size": predictor.image_size, "backend": jax.default_backend(),
            "devices": jax.local_device_count()}
  if args.json:
    print(json.dumps({**info, **(cold or {}), **warm}, indent=2))
  else:
    print(_report(info, cold, warm))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxcls-benchmark predict ARGS`."""
  return common.run(lambda: _measure(argv))
