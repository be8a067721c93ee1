"""How fast the HTTP server answers, against the same images through the Predictor.

    jaxcls-benchmark serve [--workdir DIR] [--image-size 128]
        [--widths 32,64,128,256] [--concurrency 1,8,32] [--requests 320] [--images 64]
        [--max-batch 32 | --batch-sizes 1,8,32] [--max-wait-ms 5]

Starts `jaxcls-serve` (`python -m jaxcls.cli.serve --port 0`) on 127.0.0.1 in a process
of its own, then for each concurrency C runs C client threads, each with one keep-alive
connection (httpx), sending one JPEG per request (raw body) until `--requests` requests
are answered. Prints one JSON object:

- `startup_s`: launch to the "Serving" line, with an empty compilation cache (loading
  the checkpoint, compiling every padded batch size);
- per concurrency: `requests_per_s`, latency `p50_ms` and `p99_ms` (request sent to
  answer read), `images_per_model_call` (the batching the server achieved),
  `padded_rows_used` (images over the rows of the padded calls) and `model_calls` (per
  padded size),
  `server_cpu_ms_per_request` (the server process's CPU time, every thread, Linux
  only), `over_predictor` (requests/s over the Predictor's images/s) and
  `cpu_over_predictor` (CPU time per request over the Predictor's per image);
- `predictor_images_per_s` and `predictor_cpu_ms_per_image`: the same encoded images
  through one `Predictor` in this process (`predict_images`, batches of the largest
  batch size, threaded decode), the server stopped meanwhile.

On a machine shared with other work, wall-clock rates swing from run to run; CPU time
per request swings less.

The clients run on the same machine as the server and share its cores. Without
--workdir it measures the cats-vs-dogs recipe's model (the CNN 32-64-128-256 at 128 px)
with random weights; the images are 500x375 photo-like JPEGs
(`jaxcls.benchmark.loader.write_photo_jpegs`).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

import numpy as np

from jaxcls.benchmark import REPO_ROOT, uncached_environment
from jaxcls.benchmark.loader import write_photo_jpegs
from jaxcls.benchmark.predict import add_model_flags, workdir_or_random
from jaxcls.cli import common

STARTUP_DEADLINE_S = 600


def _images(folder: str, count: int) -> list[bytes]:
  write_photo_jpegs(folder, per_class=(count + 1) // 2)
  paths = sorted(os.path.join(folder, c, f) for c in ("cat", "dog")
                 for f in os.listdir(os.path.join(folder, c)))[:count]
  out = []
  for path in paths:
    with open(path, "rb") as f:
      out.append(f.read())
  return out


def start_server(workdir: str, scratch: str, args) -> tuple[subprocess.Popen, str, float]:
  """(process, URL, seconds from launch to its "Serving" line)."""
  command = [sys.executable, "-m", "jaxcls.cli.serve", "--workdir", workdir, "--port",
             "0", "--no-access-log", "--batch-sizes", ",".join(map(str, args.sizes)),
             "--max-wait-ms", str(args.max_wait_ms),
             "--compilation-cache", os.path.join(scratch, "cache")]
  env = uncached_environment()
  start = time.perf_counter()
  with open(os.path.join(scratch, "server.log"), "w") as log:
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=log)
  lines = queue.Queue()
  threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
  try:
    line = lines.get(timeout=STARTUP_DEADLINE_S)
  except queue.Empty:
    line = ""
  if not line.startswith("Serving "):
    proc.kill()
    with open(os.path.join(scratch, "server.log")) as f:
      raise RuntimeError(f"the server did not start: {line}{f.read()[-2000:]}")
  return proc, line.split()[-1], time.perf_counter() - start


def _client(url: str, images: list[bytes], count: int, first: int) -> list[float]:
  """Latencies (s) of `count` requests on one keep-alive connection."""
  import httpx
  latencies = []
  with httpx.Client(base_url=url, timeout=120) as client:
    for i in range(count):
      body = images[(first + i) % len(images)]
      start = time.perf_counter()
      response = client.post("/predict", content=body,
                             headers={"Content-Type": "image/jpeg"})
      latencies.append(time.perf_counter() - start)
      if response.status_code != 200:
        raise RuntimeError(f"request failed: {response.status_code} {response.text}")
  return latencies


def process_cpu_s(pid: int) -> float | None:
  """CPU seconds (user + system, every thread) of process `pid` so far; None off Linux."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rpartition(")")[2].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _model_calls(url: str) -> tuple[int, dict[str, int]]:
  """(images answered, model calls per padded size) so far."""
  import httpx
  info = httpx.get(url + "/info").json()
  return info["images"], info["model_calls"]


def load(url: str, pid: int, images: list[bytes], concurrency: int,
         requests: int) -> dict:
  """Requests/s, p50/p99 latency, images per model call and the server's CPU time per
  request with `concurrency` clients."""
  per_client = [requests // concurrency + (i < requests % concurrency)
                for i in range(concurrency)]
  _client(url, images, 2, 0)  # A connection's first requests, not measured.
  images_before, calls_before = _model_calls(url)
  cpu_before = process_cpu_s(pid)
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    runs = list(pool.map(lambda i: _client(url, images, per_client[i], 7 * i),
                         range(concurrency)))
  seconds = time.perf_counter() - start
  cpu = None if cpu_before is None else process_cpu_s(pid) - cpu_before
  images_after, calls_after = _model_calls(url)
  calls = {size: calls_after[size] - calls_before[size] for size in calls_after}
  answered = images_after - images_before
  latencies = np.concatenate(runs) * 1000
  return {"concurrency": concurrency, "requests": len(latencies),
          "server_cpu_ms_per_request": None if cpu is None else 1000 * cpu / len(latencies),
          "requests_per_s": len(latencies) / seconds,
          "p50_ms": float(np.percentile(latencies, 50)),
          "p99_ms": float(np.percentile(latencies, 99)),
          "images_per_model_call": answered / max(1, sum(calls.values())),
          "padded_rows_used": answered / max(1, sum(int(k) * v for k, v in calls.items())),
          "model_calls": {k: v for k, v in calls.items() if v}}


def predictor_rate(workdir: str, images: list[bytes], batch: int,
                   repeats: int = 3) -> tuple[float, float]:
  """(images/s, CPU ms per image) of `Predictor.predict_images` on the encoded images:
  the best of `repeats` for the rate, their mean for the CPU time (this process's)."""
  from jaxcls.serve import Predictor
  predictor = Predictor.from_workdir(workdir, batch_size=batch)
  predictor.predict_images(images)  # Compile every bucket the images need.
  best, cpu_start = float("inf"), time.process_time()
  for _ in range(repeats):
    start = time.perf_counter()
    predictor.predict_images(images)
    best = min(best, time.perf_counter() - start)
  cpu_ms = 1000 * (time.process_time() - cpu_start) / (repeats * len(images))
  return len(images) / best, cpu_ms


def build_parser() -> common.Parser:
  parser = common.Parser(prog="jaxcls-benchmark serve",
                         description=__doc__.split("\n\n")[0])
  add_model_flags(parser)
  parser.add_argument("--concurrency", default="1,8,32",
                      help="Concurrent clients, comma-separated (default 1,8,32).")
  parser.add_argument("--requests", type=common.positive_int, default=320,
                      help="Requests per concurrency level (default 320).")
  parser.add_argument("--images", type=common.positive_int, default=64,
                      help="Distinct 500x375 JPEGs the requests cycle through.")
  parser.add_argument("--max-batch", type=common.positive_int, default=32,
                      help="The server's --max-batch (padded sizes 1, 2, 4, ...) and the "
                           "Predictor's batch size.")
  parser.add_argument("--batch-sizes", default=None, metavar="N,N,...",
                      help="The server's padded sizes instead (the largest is also the "
                           "Predictor's batch size).")
  parser.add_argument("--max-wait-ms", type=float, default=5.0)
  return parser


def _measure(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  levels = [common.positive_int(c) for c in args.concurrency.split(",")]
  from jaxcls.cli import serve as serve_cli
  if args.batch_sizes is not None:
    args.max_batch = None  # The sizes say it.
  args.sizes = serve_cli.batch_sizes(args)
  with tempfile.TemporaryDirectory(prefix="jaxcls_serve_bench_") as scratch:
    workdir = workdir_or_random(args, scratch)
    images = _images(os.path.join(scratch, "images"), args.images)
    proc, url, startup = start_server(workdir, scratch, args)
    try:
      results = [load(url, proc.pid, images, c, args.requests) for c in levels]
    finally:
      proc.send_signal(signal.SIGINT)
      proc.wait(120)
    rate, cpu_ms = predictor_rate(workdir, images, args.sizes[-1])
  for row in results:
    row["over_predictor"] = row["requests_per_s"] / rate
    if row["server_cpu_ms_per_request"] is not None:
      row["cpu_over_predictor"] = row["server_cpu_ms_per_request"] / cpu_ms
  print(json.dumps({"image_size": args.image_size, "widths": args.widths,
                    "cpu_cores": os.cpu_count(), "batch_sizes": list(args.sizes),
                    "max_wait_ms": args.max_wait_ms, "startup_s": startup,
                    "predictor_images_per_s": rate, "predictor_cpu_ms_per_image": cpu_ms,
                    "levels": results}, indent=2))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxcls-benchmark serve ARGS`."""
  return common.run(lambda: _measure(argv))
