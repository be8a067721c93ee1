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

from typing import Iterator, Sequence

import grain
import numpy as np

from jaxcls.data import preprocess


def _load_rows(source, indices: Sequence[int], image_size: int) -> dict:
  images = np.empty((len(indices), image_size, image_size, 3), np.uint8)
  labels = np.empty((len(indices),), np.int32)
  for row, index in enumerate(indices):
    record = None
    try:
      record = source[int(index)]
      # A cached source (jaxcls.data.cache) hands back the preprocessed image.
      images[row] = (record["image"] if "image" in record
                     else preprocess.load_image(record["data"], image_size))
    except preprocess.ImageError as e:
      name = record["path"] if record else e.name
      raise preprocess.ImageError(name, e.reason + " (the file changed after it was "
                                  "verified; run again to re-verify)") from None
    labels[row] = record["label"]
  return {"image": images, "label": labels, "mask": np.ones((len(indices),), bool)}


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
    return _load_rows(source, [order[i] for i in range(first, first + local)], image_size)

  steps = grain.MapDataset.range(start_step, num_steps).map(batch_for_step)
  options = grain.ReadOptions(num_threads=max(1, workers), prefetch_buffer_size=min(2 * workers, 16))
  return iter(steps.to_iter_dataset(options))


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
    rows = _load_rows(source, chunk, image_size)
    pad = local - len(chunk)
    if pad:
      rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              for k, v in rows.items()}
    return rows

  batches = grain.MapDataset.range(num_batches).map(batch_at)
  options = grain.ReadOptions(num_threads=max(1, workers), prefetch_buffer_size=min(2 * workers, 16))
  return iter(batches.to_iter_dataset(options))
