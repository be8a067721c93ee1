"""Decode once: keeps decoded, resized uint8 images so later epochs decode no JPEG.

`data.cache` picks where they are kept:
- "none": nothing is kept; every epoch decodes again (the least memory), except that
  training keeps the validation split in memory when it takes at most
  VAL_MEMORY_BUDGET: it is read every epoch, and whole.
- "memory": one uint8 array [N, S, S, 3] per split in RAM, filled as examples are first
  read (N × S² × 3 bytes: 20,000 images at 160 px are 1.5 GB).
- "disk": the same arrays as memory-mapped .npy files in WORKDIR/cache/, named after the
  source's contents and the image size, so a later run (or a resumed one) reuses them.

A cached source returns records with "image" (already preprocessed) instead of "data".
Decoding is deterministic, so a cached run sees exactly the pixels an uncached run sees.
"""

from __future__ import annotations

import os

import numpy as np

from jaxcls.data import preprocess

CACHE_DIR = "cache"
CACHE_KINDS = ("none", "memory", "disk")
# With data.cache="none", training keeps the validation split decoded in memory when its
# images take at most this (cats vs dogs' 4,700 at 224 px: 0.7 GB; ImageNet's: 7.5 GB).
VAL_MEMORY_BUDGET = 2 ** 30


class CachedSource:
  """Wraps a random-access source; decodes each example once, then serves the copy."""

  def __init__(self, source, image_size: int, images: np.ndarray, labels: np.ndarray,
               filled: np.ndarray):
    self.source = source
    self.image_size = image_size
    self.images = images  # uint8 [N, S, S, 3]
    self.labels_array = labels  # int32 [N]
    self.filled = filled  # uint8 [N]: 1 once row i holds example i.

  def __len__(self) -> int:
    return len(self.source)

  def __getattr__(self, name):
    # paths, labels, key, identity, ... of the wrapped source.
    if name == "source":
      raise AttributeError(name)
    return getattr(self.source, name)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if self.filled[index]:
      return {"image": self.images[index], "label": int(self.labels_array[index]),
              "path": f"cached[{index}]"}
    record = self.source[index]
    try:
      image = preprocess.load_image(record["data"], self.image_size)
    except preprocess.ImageError as e:
      raise preprocess.ImageError(record["path"], e.reason) from None
    self.images[index] = image
    self.labels_array[index] = record["label"]
    self.filled[index] = 1  # Written last: a row is never marked before it is complete.
    return {"image": image, "label": record["label"], "path": record["path"]}

  @property
  def num_cached(self) -> int:
    return int(np.count_nonzero(self.filled))


def _disk_arrays(directory: str, n: int, size: int):
  """Opens (or creates) images.npy, labels.npy and filled.npy in `directory`."""
  os.makedirs(directory, exist_ok=True)
  shapes = {"images": ((n, size, size, 3), np.uint8), "labels": ((n,), np.int32),
            "filled": ((n,), np.uint8)}
  arrays, created = {}, False
  for name, (shape, dtype) in shapes.items():
    path = os.path.join(directory, f"{name}.npy")
    try:
      existing = np.load(path, mmap_mode="r+")
      if existing.shape == shape and existing.dtype == dtype:
        arrays[name] = existing
        continue
    except (OSError, ValueError):
      pass  # Missing, damaged or of another shape: created below.
    arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    created = True
  if created:
    arrays["filled"][:] = 0  # Rows of a rebuilt file are not to be trusted.
  return arrays["images"], arrays["labels"], arrays["filled"]


def kept_in_memory_if_fits(source, image_size: int, budget: int = VAL_MEMORY_BUDGET):
  """`source` cached in memory when its decoded images take at most `budget` bytes;
  `source` itself otherwise, or when it is cached already."""
  if isinstance(source, CachedSource) or len(source) * image_size ** 2 * 3 > budget:
    return source
  return cached(source, "memory", image_size, None)


def cached(source, kind: str, image_size: int, workdir: str | None):
  """`source` itself for "none", else a CachedSource kept in memory or on disk."""
  if kind == "none":
    return source
  n = len(source)
  if kind == "memory":
    # np.zeros maps pages lazily: memory grows only as images are decoded.
    return CachedSource(source, image_size, np.zeros((n, image_size, image_size, 3),
                                                     np.uint8),
                        np.zeros((n,), np.int32), np.zeros((n,), np.uint8))
  if kind == "disk":
    if not workdir:
      raise ValueError("data.cache='disk' needs a workdir; use 'memory' or set one.")
    directory = os.path.join(workdir, CACHE_DIR, f"{source.identity}_{image_size}px")
    return CachedSource(source, image_size, *_disk_arrays(directory, n, image_size))
  raise ValueError(f"data.cache is {kind!r}; use one of {', '.join(CACHE_KINDS)}.")
