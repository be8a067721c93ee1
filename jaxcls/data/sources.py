"""Where examples come from, chosen by `data.source`.

- `folder:PATH` — one subfolder per class (class names sorted), images anywhere below.
- `generated:shapes` — a two-class image folder drawn with Pillow into the workdir, so
  the whole pipeline runs offline.

Each source is split into train and validation by a hash of the file's path relative
to the root (and the seed): a file's split never changes when other files are added.
Every file is decoded once before training; those that fail are skipped and listed in
`WORKDIR/skipped_files.jsonl`. Results are cached by (path, size, mtime).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
from typing import Sequence

import numpy as np
from PIL import Image

from jaxcls.data import preprocess

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
SKIPPED_FILE = "skipped_files.jsonl"
VERIFY_CACHE_FILE = "verified_files.json"


class DataError(ValueError):
  """The data set cannot be used as configured; says what to change."""


@dataclasses.dataclass(frozen=True)
class FileSource:
  """Random-access list of labelled image files (a grain data source)."""
  root: str
  paths: tuple[str, ...]  # Relative to root.
  labels: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    path = os.path.join(self.root, self.paths[index])
    with open(path, "rb") as f:
      data = f.read()
    return {"data": data, "label": self.labels[index], "path": self.paths[index]}


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: FileSource
  val: FileSource
  class_names: tuple[str, ...]
  skipped: tuple[dict, ...] = ()


def split_fraction(seed: int, relative_path: str) -> float:
  """A number in [0, 1) fixed by the seed and the file's relative path alone."""
  digest = hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64


def is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_folder(root: str) -> tuple[list[str], list[int], tuple[str, ...]]:
  """Relative paths, labels and sorted class names of a folder of class subfolders."""
  if not os.path.isdir(root):
    raise DataError(f"Image folder '{root}' does not exist. Point data.source at a folder "
                    "with one subfolder per class, e.g. folder:/data/PetImages.")
  class_names = tuple(sorted(
      d for d in os.listdir(root)
      if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")))
  if len(class_names) < 2:
    raise DataError(f"Image folder '{root}' has {len(class_names)} class subfolder(s) "
                    f"{list(class_names)}; a classifier needs at least two. Put each "
                    "class's images in its own subfolder (e.g. Cat/, Dog/).")
  paths, labels = [], []
  for label, name in enumerate(class_names):
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for filename in filenames:
        if is_image_name(filename) and not filename.startswith("."):
          found.append(os.path.relpath(os.path.join(dirpath, filename), root))
    if not found:
      raise DataError(f"Class folder '{os.path.join(root, name)}' holds no images "
                      f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}). Add images "
                      "or remove the folder.")
    found.sort()
    paths.extend(found)
    labels.extend([label] * len(found))
  return paths, labels, class_names


def _check_one(args: tuple[str, int]) -> str | None:
  path, size = args
  try:
    preprocess.load_image(path, size)
    return None
  except preprocess.ImageError as e:
    return e.reason


def verify_files(root: str, paths: Sequence[str], image_size: int, workdir: str | None,
                 workers: int) -> dict[str, str]:
  """Decodes every file once (in worker threads); returns {path: reason} of failures.

  Results are cached in the workdir keyed by relative path, size and mtime, so a second
  run decodes only new or changed files.
  """
  cache_path = os.path.join(workdir, VERIFY_CACHE_FILE) if workdir else None
  cache: dict = {}
  if cache_path and os.path.exists(cache_path):
    with open(cache_path) as f:
      cache = json.load(f)
  results: dict[str, str | None] = {}
  todo = []
  for rel in paths:
    stat = os.stat(os.path.join(root, rel))
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    hit = cache.get(rel)
    if hit and hit[0] == stamp:
      results[rel] = hit[1]
    else:
      todo.append((rel, stamp))
  if todo:
    # Tiny decodes are enough to tell good from broken; draft mode makes JPEGs fast.
    jobs = [(os.path.join(root, rel), min(image_size, 32)) for rel, _ in todo]
    if workers > 1 and len(jobs) > 64:
      # Threads, not processes: Pillow releases the GIL while decoding, and a process
      # pool would re-import the caller's __main__ (spawn) or fork JAX's threads.
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(_check_one, jobs))
    else:
      reasons = [_check_one(job) for job in jobs]
    for (rel, stamp), reason in zip(todo, reasons):
      results[rel] = reason
      cache[rel] = [stamp, reason]
    if cache_path:
      tmp = cache_path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(cache, f)
      os.replace(tmp, cache_path)
  return {rel: reason for rel, reason in results.items() if reason is not None}


def draw_shapes(root: str, per_class: int, seed: int, size: int = 64) -> None:
  """Writes a two-class folder, `disc/` and `stripes/`, as JPEG and PNG files.

  A disc is a filled circle; stripes are a square patch of parallel bars. Colours,
  sizes, positions, stripe direction and pixel noise are random, so the classes differ
  only in shape and texture.
  """
  rng = np.random.default_rng(seed)
  for name in ("disc", "stripes"):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      background = rng.integers(0, 256, 3)
      color = rng.integers(0, 256, 3)
      while np.abs(color - background).sum() < 200:
        color = rng.integers(0, 256, 3)
      half = rng.uniform(0.2, 0.35) * size
      cy, cx = rng.uniform(half + 1, size - half - 1, 2)
      ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
      if name == "disc":
        inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= half ** 2
      else:
        period = max(4.0, size / 8)
        along = xs if rng.random() < 0.5 else ys
        inside = ((np.abs(ys - cy) <= half) & (np.abs(xs - cx) <= half)
                  & ((along // (period / 2)) % 2 == 0))
      pixels = np.where(inside[..., None], color, background).astype(np.float64)
      pixels += rng.normal(0, 10, pixels.shape)
      image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
      ext = "jpg" if i % 2 == 0 else "png"
      image.save(os.path.join(root, name, f"{name}_{i:04d}.{ext}"))


def _folder_for(spec: str, data_config, workdir: str | None, seed: int) -> str:
  kind, _, arg = spec.partition(":")
  if kind == "folder":
    return os.path.expanduser(arg)
  if kind == "generated":
    if arg != "shapes":
      raise DataError(f"data.source '{spec}': the only generated set is 'generated:shapes'.")
    if not workdir:
      raise DataError("data.source 'generated:shapes' needs a workdir to draw into.")
    root = os.path.join(workdir, "generated_shapes")
    marker = os.path.join(root, ".complete")
    if not os.path.exists(marker):
      draw_shapes(root, data_config.generated_per_class, seed)
      open(marker, "w").close()
    return root
  raise DataError(f"data.source '{spec}' is not understood. Use folder:PATH (one "
                  "subfolder per class) or generated:shapes.")


def build_dataset(data_config, seed: int, workdir: str | None = None,
                  workers: int | None = None) -> Dataset:
  """Lists, verifies and splits the configured source.

  Broken files are skipped and written to WORKDIR/skipped_files.jsonl.
  """
  root = _folder_for(data_config.source, data_config, workdir, seed)
  paths, labels, class_names = list_folder(root)
  workers = workers or data_config.workers or os.cpu_count() or 1
  broken = verify_files(root, paths, data_config.image_size, workdir, workers)
  skipped = tuple({"path": os.path.join(root, p), "reason": broken[p]}
                  for p in paths if p in broken)
  if workdir:
    with open(os.path.join(workdir, SKIPPED_FILE), "w") as f:
      for row in skipped:
        f.write(json.dumps(row) + "\n")
  if skipped:
    logging.warning("Skipped %d unreadable image file(s); see %s", len(skipped),
                    os.path.join(workdir or ".", SKIPPED_FILE))
  kept = [(p, l) for p, l in zip(paths, labels) if p not in broken]
  for label, name in enumerate(class_names):
    if not any(l == label for _, l in kept):
      raise DataError(f"Class '{name}' has no readable images left after skipping "
                      f"broken files (see {SKIPPED_FILE}).")
  train, val = [], []
  for p, l in kept:
    (val if split_fraction(seed, p) < data_config.val_fraction else train).append((p, l))
  for split_name, split in (("training", train), ("validation", val)):
    if not split:
      raise DataError(f"The {split_name} split of '{root}' is empty ({len(kept)} images, "
                      f"data.val_fraction={data_config.val_fraction}). Add images or "
                      "change data.val_fraction.")

  def make(split):
    return FileSource(root, tuple(p for p, _ in split), tuple(l for _, l in split))

  return Dataset(make(train), make(val), class_names, skipped)
