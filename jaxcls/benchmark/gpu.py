"""The first accelerator run in one script: the train step, the loader, the flagship recipe.

    bash benchmarks/gpu.sh [--smoke] [--out DIR]    # = jaxcls-benchmark gpu

Prints one JSON line per figure, as each is measured, and appends them to
`DIR/gpu_benchmark.jsonl` (`--out`, else `$OUT` when set):
1. `synthetic`: ResNet-50 at 224 px in bfloat16, the step training runs (augmentation,
   forward, backward, SGD, state donated) on one batch already on the device: compile
   time, FLOPs per image, images/sec, percent of a bfloat16 matmul's peak measured in the
   same run and of the H200's dense bfloat16 peak. Compiled once, with JAX's persistent
   compilation cache on (a second run shows the warm compile time).
2. `loader`: the same compiled step fed by the real loader from photo-sized JPEGs
   (500×375, as PetImages: decoding and resizing cost what they would), the pipeline
   started after compiling, so that no batch is decoded during the compile; also the
   pipeline alone, the CPU cost per image on one core and the images/sec that projects
   to on the CPUs this process may use.
3. `flagship`: `configs/catdog.py` trained as a user would (`run_train.py`) on
   `PetImages-180.zip` when `../shared/data/` or `shared/data/` (from the repo root) holds
   it: validation accuracy and wall time at each epoch, time to 80/85/90 %, stopped
   (SIGTERM, checkpoint kept) when the time budget runs out.

`--smoke` runs the same code on a CPU in well under a minute: a small CNN at 32 px, a
few JPEGs and steps, the flagship recipe for one short epoch on generated images.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from jaxcls.benchmark import REPO_ROOT
from jaxcls.cli import common

H200_DENSE_BF16_FLOPS = 989e12  # NVIDIA's figure for the H200 SXM, without sparsity.
RESNET50_TRAIN_FLOP_PER_IMAGE = 24.7e9  # 3 × ResNet-50's forward pass at 224 px.
FLAGSHIP_RECIPE = "configs/catdog.py"
PETIMAGES_ZIP = "PetImages-180.zip"
# Where the shared data lies, from the repo root: beside the checkout (a development
# machine) or inside it (the device machine's copy of the working tree).
SHARED_DATA_DIRS = ("../shared/data", "shared/data")
OUT_FILE = "gpu_benchmark.jsonl"
ACCURACY_TARGETS = (0.80, 0.85, 0.90)
# --smoke: the same code path at sizes a 2-core CPU runs in seconds.
SMOKE = dict(model="cnn", image_size=32, batch_size=8, dtype="float32", steps=2,
             loader_steps=3, jpegs=8, matmul_size=128, budget_s=300)
SMOKE_FLAGSHIP_OVERRIDES = ("--config.data.source=generated:shapes",
                            "--config.data.generated_per_class=24",
                            "--config.data.image_size=40",
                            "--config.train.progressive_sizes=(32,)",
                            "--config.batch_size=16",
                            "--config.num_epochs=1", "--config.data.cache=none")


def build_parser() -> common.Parser:
  parser = common.Parser(prog="jaxcls-benchmark gpu",
                         description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true",
                      help="Tiny sizes on any backend: checks the script in CI.")
  parser.add_argument("--batch-size", type=common.positive_int, default=256)
  parser.add_argument("--model", default="resnet50")
  parser.add_argument("--image-size", type=common.positive_int, default=224)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--matmul-size", type=common.positive_int, default=8192)
  parser.add_argument("--steps", type=common.positive_int, default=30)
  parser.add_argument("--loader-steps", type=common.positive_int, default=20)
  parser.add_argument("--jpegs", type=common.positive_int, default=128,
                      help="500x375 JPEGs per class for the loader figure (read in turn).")
  parser.add_argument("--budget-s", type=float, default=450.0,
                      help="The whole run's time; the flagship run is stopped at its end.")
  parser.add_argument("--flagship-source", default=None,
                      help="data.source of the flagship run (default: zip:PetImages-180.zip "
                           "when found; --smoke: generated images).")
  parser.add_argument("--out", default=None, help="Folder for gpu_benchmark.jsonl "
                      "(default: $OUT when set).")
  parser.add_argument("--workdir", default=None, help="Scratch folder (default: temporary).")
  parser.add_argument("--compilation-cache", default=None, metavar="DIR")
  return parser


def parse(argv) -> argparse.Namespace:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.smoke:  # Smoke sizes, unless given on the command line.
    parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
  return args


def _config(args):
  from jaxcls.config import base_config
  config = base_config()
  config.model.name = args.model
  config.model.dtype = args.dtype
  config.model.dropout = 0.2
  config.data.image_size = args.image_size
  config.data.val_fraction = 0.1
  config.augment.flip = True
  config.augment.rotation = 10.0
  config.augment.scale = (0.9, 1.1)
  config.batch_size = args.batch_size
  config.optim.learning_rate = 0.1
  return config


class Figures:
  """Prints each figure as one JSON line and appends it to OUT/gpu_benchmark.jsonl."""

  def __init__(self, out_dir: str | None, common_fields: dict):
    self.path = os.path.join(out_dir, OUT_FILE) if out_dir else None
    self.common_fields = common_fields
    if self.path:
      os.makedirs(out_dir, exist_ok=True)

  def emit(self, name: str, values: dict) -> dict:
    line = {"figure": name, **self.common_fields, **values}
    print(json.dumps(line), flush=True)
    if self.path:
      with open(self.path, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def synthetic_figure(step, args) -> dict:
  import jax.numpy as jnp
  from jaxcls.benchmark import step as step_benchmark
  figure = step_benchmark.time_train_step(step, steps=args.steps, warmup=3)
  figure.update(step_benchmark.matmul_peak(args.matmul_size, dtype=jnp.dtype(args.dtype)))
  if figure["achieved_gflops"]:
    figure["percent_of_matmul_peak"] = round(
        100 * figure["achieved_gflops"] / figure["matmul_peak_gflops"], 1)
  if args.model == "resnet50" and args.image_size == 224:
    figure["percent_of_h200_dense_bf16_peak"] = round(
        100 * figure["step_images_per_sec"] * RESNET50_TRAIN_FLOP_PER_IMAGE
        / H200_DENSE_BF16_FLOPS, 1)
  return figure


def decode_cost_ms(root: str, image_size: int, count: int = 40) -> float:
  """CPU milliseconds to read, decode and resize one of the JPEGs, on one core."""
  from jaxcls.data import preprocess
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
  paths = paths[:count]
  for path in paths[:4]:  # Warm the page cache and the imports.
    preprocess.load_image(path, image_size)
  start = time.process_time()
  for path in paths:
    preprocess.load_image(path, image_size)
  return 1000 * (time.process_time() - start) / len(paths)


def loader_figure(step, args, workdir: str) -> dict:
  from jaxcls.benchmark import loader as loader_benchmark
  from jaxcls.benchmark import step as step_benchmark
  from jaxcls.data import sources
  root = os.path.join(workdir, f"jpegs_500x375_{args.jpegs}")
  start = time.perf_counter()
  loader_benchmark.write_photo_jpegs(root, args.jpegs)
  figure = {"jpeg_size": [500, 375], "jpegs": 2 * args.jpegs,
            "write_jpegs_s": round(time.perf_counter() - start, 1)}
  figure.update(step_benchmark.measure_loader_steps(
      step, "folder:" + root, steps=args.loader_steps, workdir=workdir))
  cpu_ms = decode_cost_ms(root, args.image_size)
  cpus = sources.usable_cpu_count()
  figure.update({"decode_cpu_ms_per_image": round(cpu_ms, 2), "usable_cpus": cpus,
                 "projected_host_images_per_sec": round(cpus * 1000 / cpu_ms, 1),
                 "projected_16_core_images_per_sec": round(16 * 1000 / cpu_ms, 1)})
  return figure


def find_petimages() -> str | None:
  for folder in SHARED_DATA_DIRS:
    path = os.path.normpath(os.path.join(REPO_ROOT, folder, PETIMAGES_ZIP))
    if os.path.isfile(path):
      return path
  return None


def _val_rows(path: str) -> list[dict]:
  """The validation rows of metrics.jsonl so far (a line being written is left out)."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          break
        if row.get("split") == "val":
          rows.append(row)
  return rows


def _stop(child: subprocess.Popen, grace_s: float) -> None:
  """SIGTERM (jaxcls saves a checkpoint and stops), then SIGKILL after `grace_s`."""
  child.send_signal(signal.SIGTERM)
  try:
    child.wait(grace_s)
  except subprocess.TimeoutExpired:
    child.kill()
    child.wait()


def _flagship_command(args, workdir: str) -> list[str] | str:
  """run_train.py's command line, or why there is no flagship run."""
  if args.flagship_source:
    source = args.flagship_source
  elif args.smoke:
    source = None
  else:
    zip_path = find_petimages()
    if zip_path is None:
      return (f"no {PETIMAGES_ZIP} in {' or '.join(SHARED_DATA_DIRS)} (from the repo root); "
              "pass --flagship-source=KIND:PATH")
    source = "zip:" + zip_path
  command = [sys.executable, os.path.join(REPO_ROOT, "run_train.py"),
             "--config", os.path.join(REPO_ROOT, FLAGSHIP_RECIPE), "--workdir", workdir]
  if args.smoke:
    command += SMOKE_FLAGSHIP_OVERRIDES
  if source:
    command.append(f"--config.data.source={source}")
  return command


def flagship_figure(args, workdir: str, deadline: float, cache_dir: str | None) -> dict:
  """configs/catdog.py trained by run_train.py: accuracy and wall time at each epoch."""
  run_dir = os.path.join(workdir, "flagship")
  command = _flagship_command(args, run_dir)
  if isinstance(command, str):
    return {"skipped": command}
  env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
         # The parent keeps the memory it used: the child takes what it needs, no more.
         "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  if cache_dir:
    env[common.CACHE_ENV] = cache_dir
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  log_path = os.path.join(workdir, "flagship.log")
  start = time.perf_counter()
  epochs, stopped = [], False
  with open(log_path, "w") as log:
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    while child.poll() is None or len(epochs) < len(_val_rows(metrics_path)):
      for row in _val_rows(metrics_path)[len(epochs):]:
        epochs.append({"epoch": row.get("epoch"), "step": row["step"],
                       "accuracy": row["accuracy"], "loss": row["loss"],
                       "wall_s": round(time.perf_counter() - start, 1)})
      if child.poll() is None and time.perf_counter() > deadline:
        _stop(child, grace_s=20)
        stopped = True
      time.sleep(0.2)
  figure = {"recipe": FLAGSHIP_RECIPE, "command": " ".join(command[1:]),
            "returncode": child.returncode, "stopped_at_budget": stopped,
            "finished": child.returncode == 0 and not stopped,
            "wall_s": round(time.perf_counter() - start, 1), "epochs": epochs,
            "best_val_accuracy": max((e["accuracy"] for e in epochs), default=None),
            "time_to_accuracy_s": {
                f"{t:.2f}": next((e["wall_s"] for e in epochs if e["accuracy"] >= t), None)
                for t in ACCURACY_TARGETS}}
  if child.returncode not in (0, None) and not stopped:
    with open(log_path) as f:
      figure["log_tail"] = f.read()[-2000:]
  return figure


def _environment(jax) -> dict:
  device = jax.devices()[0]
  return {"device": str(device.device_kind), "platform": device.platform,
          "devices": jax.local_device_count(), "jax_version": jax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def measure(args) -> int:
  started = time.perf_counter()
  deadline = started + args.budget_s
  cache_dir = common.enable_compilation_cache(args.compilation_cache)
  import jax
  from jaxcls.benchmark import step as step_benchmark
  figures = Figures(args.out or os.environ.get("OUT") or None, _environment(jax))
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxcls_gpu_bench_")
  os.makedirs(workdir, exist_ok=True)
  # Compiled once: the synthetic and the loader figures run the same executable.
  step = step_benchmark.compile_train_step(_config(args), devices=jax.local_devices()[:1])
  synthetic = synthetic_figure(step, args)
  synthetic["compilation_cache"] = cache_dir or jax.config.jax_compilation_cache_dir
  figures.emit("synthetic", synthetic)
  figures.emit("loader", loader_figure(step, args, workdir))
  del step  # Its buffers go back to the parent's pool before the flagship run starts.
  figures.emit("flagship", flagship_figure(args, workdir, deadline - 25, cache_dir))
  print(json.dumps({"figure": "total", "total_s": round(time.perf_counter() - started, 1)}),
        flush=True)
  return 0


def main(argv=None) -> int:
  """`jaxcls-benchmark gpu ARGS`."""
  return common.run(lambda: measure(parse(argv)))
