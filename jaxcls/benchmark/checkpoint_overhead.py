"""Step time with checkpointing off, asynchronous and synchronous.

    jaxcls-benchmark checkpoint [--widths 64,128,256] [--every 5] [--steps 60]

Trains the CNN on generated shapes for one epoch of `--steps` steps three times: with no
checkpoint inside the epoch, saving every `--every` steps asynchronously (the default),
and saving every `--every` steps synchronously (checkpoint.async_save=False). Reports
the median wall time of a step (the first log interval, which compiles, is dropped) and
the median time the training loop spends blocked inside each save call, and the
checkpoint size. Each log interval holds exactly one save.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time

import jax

from jaxcls import checkpoint, metric_writers, train
from jaxcls.cli import common
from jaxcls.config import base_config


def make_config(args, data_dir: str, every: int, async_save: bool):
  config = base_config()
  config.data.source = f"folder:{data_dir}"
  config.data.image_size = args.image_size
  config.data.val_fraction = 0.05
  config.data.workers = 2
  config.model.widths = tuple(int(w) for w in args.widths.split(","))
  config.batch_size = args.batch_size
  config.num_epochs = 1
  config.train.log_every_steps = args.every
  config.train.progress_bar = False
  config.checkpoint.every_steps = every
  config.checkpoint.async_save = async_save
  return config


def run(args, data_dir: str, every: int, async_save: bool) -> dict:
  workdir = tempfile.mkdtemp(prefix="jaxcls-bench-")
  blocked = []  # Seconds the training loop spends inside each save call.
  save = checkpoint.save

  def timed_save(*a, **k):
    begin = time.perf_counter()
    save(*a, **k)
    blocked.append(time.perf_counter() - begin)

  checkpoint.save = timed_save
  start = time.perf_counter()
  try:
    state, _ = train.train_and_evaluate(make_config(args, data_dir, every, async_save),
                                        workdir)
  finally:
    checkpoint.save = save
  total = time.perf_counter() - start
  rows = [r for r in metric_writers.read_metrics(workdir) if r["split"] == "train"]
  # Seconds per step in each interval; the first one includes compilation.
  per_step = [args.batch_size / r["images_per_sec"] for r in rows[1:]]
  size = 0
  folder = os.path.join(workdir, "checkpoints")
  steps = sorted(os.listdir(folder))
  for root, _, files in os.walk(os.path.join(folder, steps[0])):
    size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return {"ms_per_step": 1000 * statistics.median(per_step), "total_s": total,
          "blocked_ms": 1000 * statistics.median(blocked), "saves": len(blocked),
          "checkpoint_mb": size / 2**20, "params": params}


def main(argv=None) -> int:
  parser = common.Parser(prog="jaxcls-benchmark checkpoint",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--widths", default="64,128,256")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--every", type=int, default=5)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  from jaxcls.data import sources
  data_dir = tempfile.mkdtemp(prefix="jaxcls-bench-data-")
  per_class = (args.steps * args.batch_size) // 2 + args.batch_size
  sources.draw_shapes(data_dir, per_class=per_class, seed=0, size=args.image_size)
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"widths {args.widths}, {args.image_size} px, batch {args.batch_size}, "
        f"save every {args.every} steps")
  for label, every, async_save in [("no checkpoints", 0, True),
                                   ("async save", args.every, True),
                                   ("sync save", args.every, False)]:
    result = run(args, data_dir, every, async_save)
    print(f"{label:15s} {result['ms_per_step']:8.1f} ms/step (median)   "
          f"loop blocked {result['blocked_ms']:7.1f} ms per save ({result['saves']} saves)"
          f"   run {result['total_s']:6.1f} s   checkpoint {result['checkpoint_mb']:.2f} MB"
          f"   {result['params']:,} params", flush=True)
  return 0
