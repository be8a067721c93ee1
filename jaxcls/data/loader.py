"""Batches for training and evaluation, built with grain.

A training batch is a pure function of (seed, global step): batch `g` of the run is the
g-th block of `batch_size` indices of epoch `g // steps_per_epoch`'s permutation. Resuming
at step g therefore sees exactly the batches an uninterrupted run would have seen, and
the loader's whole state is the step number stored in every checkpoint.

With several processes, every process computes the same global batch and keeps its own
contiguous slice of it, so the global batch does not depend on the process count.

A host batch is a dict of numpy arrays: `image` uint8 [B, S, S, 3], `label` int32 [B],
`mask` bool [B] (False on padding rows of the last evaluation batch); `jaxcls.parallel`
shards it over the devices.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from typing import Iterator, Sequence

import grain
import numpy as np

from jaxcls.data import preprocess


# Decode threads shared by every loader of the process, one pool per size: a batch's
# images are decoded side by side (PIL releases the GIL while it decodes and resizes),
# so a large batch uses every core, not one.
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def decode_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
  """The process's pool of `workers` decode threads (created on first use)."""
  with _POOLS_LOCK:
    if workers not in _POOLS:
      _POOLS[workers] = concurrent.futures.ThreadPoolExecutor(
          workers, thread_name_prefix="jaxcls-decode")
    return _POOLS[workers]


def _load_row(source, index: int, image_size: int) -> tuple[np.ndarray, int]:
  record = None
  try:
    record = source[int(index)]
    # A cached source (jaxcls.data.cache) hands back the preprocessed image.
    image = (record["image"] if "image" in record
             else preprocess.load_image(record["data"], image_size))
  except preprocess.ImageError as e:
    name = record["path"] if record else e.name
    raise preprocess.ImageError(name, e.reason + " (the file changed after it was "
                                "verified; run again to re-verify)") from None
  return image, record["label"]


def _load_rows(source, indices: Sequence[int], image_size: int, workers: int = 1) -> dict:
  """The rows `indices` of `source`, decoded by `workers` threads; the same arrays
  whatever the thread count (each row depends on its index only)."""
  images = np.empty((len(indices), image_size, image_size, 3), np.uint8)
  labels = np.empty((len(indices),), np.int32)
  load = functools.partial(_load_row, source, image_size=image_size)
  rows = (map(load, indices) if workers <= 1 or len(indices) <= 1
          else decode_pool(workers).map(load, indices))
  for row, (image, label) in enumerate(rows):
    images[row], labels[row] = image, label
  return {"image": images, "label": labels, "mask": np.ones((len(indices),), bool)}


def _read_options(workers: int, local_batch: int) -> grain.ReadOptions:
  """Batches in flight: enough that every decode thread has a row to work on, plus one
  being handed over; each batch is decoded by the shared pool, not by its grain thread."""
  in_flight = max(1, min(-(-workers // max(1, local_batch)) + 1, workers, 16))
  return grain.ReadOptions(num_threads=in_flight, prefetch_buffer_size=2 * in_flight)


def train_batches(source, *, batch_size: int, image_size: int, seed: int, num_steps: int,
                  start_step: int = 0, workers: int = 1, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Yields this process's share of global training batches start_step..num_steps-1."""
  steps_per_epoch = len(source) // batch_size
  local = batch_size // process_count
  order = grain.MapDataset.range(len(source)).shuffle(seed=seed)  # New order each epoch.

  def batch_for_step(step: int) -> dict:
    epoch, within = divmod(step, steps_per_epoch)
    first = epoch * len(source) + within * batch_size + process_index * local
    return _load_rows(source, [order[i] for i in range(first, first + local)], image_size,
                      workers)

  steps = grain.MapDataset.range(start_step, num_steps).map(batch_for_step)
  return iter(steps.to_iter_dataset(_read_options(workers, local)))


def eval_batches(source, *, batch_size: int, image_size: int, workers: int = 1,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Yields every example of `source` once; the last batch is padded and masked.

  With several processes, each takes a strided share and pads to the same number of
  batches, so pmapped collectives line up.
  """
  local = batch_size // process_count
  indices = np.arange(process_index, len(source), process_count)
  # The same count on every process: enough for the process with the most examples.
  num_batches = -(-(-(-len(source) // process_count)) // local)

  def batch_at(b: int) -> dict:
    chunk = indices[b * local:(b + 1) * local]
    rows = _load_rows(source, chunk, image_size, workers)
    pad = local - len(chunk)
    if pad:
      rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              for k, v in rows.items()}
    return rows

  batches = grain.MapDataset.range(num_batches).map(batch_at)
  return iter(batches.to_iter_dataset(_read_options(workers, local)))
