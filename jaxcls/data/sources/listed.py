"""What the sources that list files share (folder:, zip:, generated:): the class-folder
layout, one decode of every file before training, and the split by a hash of the path.

Folder and zip sources are split into train and validation by a hash of the file's path
relative to the class root (and the seed): a file's split never changes when other files
are added, and a zip splits exactly like the same folder extracted. Every listed file is
decoded once before training; those that fail are skipped and written to
`WORKDIR/skipped_files.jsonl`. The verdicts are cached in the workdir keyed by path, size
and modification time (CRC for zip members), so a second run decodes only new or changed
files.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Iterable, Sequence

from jaxcls.data import preprocess
from jaxcls.data.sources.base import (IMAGE_EXTENSIONS, DataError, Dataset, is_image_name,
                                      write_skipped)

VERIFY_CACHE_FILE = "verified_files.json"
# Folders that archivers add and that never hold classes.
IGNORED_FOLDERS = frozenset({"__MACOSX"})


def split_fraction(seed: int, relative_path: str) -> float:
  """A number in [0, 1) fixed by the seed and the file's relative path alone."""
  digest = hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64


def visible(parts: Sequence[str]) -> bool:
  return not any(p.startswith(".") or p in IGNORED_FOLDERS for p in parts)


def index_classes(files: Iterable[Sequence[str]], where: str, min_classes: int = 2
                  ) -> tuple[list[str], list[tuple[str, int, int]], tuple[str, ...]]:
  """Finds the class folders among image files given as path parts.

  Returns (prefix parts of the class root, [(path below the class root, label, position
  in `files`)], sorted class names). The class root is the top level, or the single
  top folder when the classes sit one level down (PetImages/Cat, PetImages/Dog).
  Training needs two classes at least; a held-out set may hold one (`min_classes=1`).
  """
  files = [(list(parts), pos) for pos, parts in enumerate(files)]
  images = [(p, pos) for p, pos in files if is_image_name(p[-1]) and visible(p)]

  def classes_at(depth: int, prefix: list[str]) -> set[str]:
    return {p[depth] for p, _ in images if len(p) > depth + 1 and p[:depth] == prefix}

  prefix: list[str] = []
  top = classes_at(0, [])
  if len(top) == 1:
    (single,) = top
    if len(classes_at(1, [single])) >= 2:
      prefix = [single]
  class_names = tuple(sorted(classes_at(len(prefix), prefix)))
  if len(class_names) < min_classes:
    needs = ("a classifier needs at least two" if min_classes > 1
             else "evaluation needs at least one")
    raise DataError(f"'{where}' has {len(class_names)} class folder(s) with images "
                    f"{list(class_names)}; {needs}. Put each "
                    "class's images in its own folder (e.g. Cat/, Dog/), at the top or "
                    "one level down (PetImages/Cat/).")
  label_of = {name: label for label, name in enumerate(class_names)}
  depth = len(prefix)
  found = [("/".join(p[depth:]), label_of[p[depth]], pos) for p, pos in images
           if p[:depth] == prefix and len(p) > depth + 1]
  found.sort(key=lambda item: (item[1], item[0]))
  return prefix, found, class_names


def check_classes(source, class_names: Sequence[str], where: str):
  for label, name in enumerate(class_names):
    if label not in source.labels:
      raise DataError(f"Class '{name}' in '{where}' holds no images (extensions: "
                      f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case). Add images or "
                      "remove the folder.")
  return source



def _check_one(source, index: int, size: int) -> str | None:
  try:
    preprocess.load_image(source[index]["data"], size)
    return None
  except preprocess.ImageError as e:
    return e.reason
  except OSError as e:  # An unreadable file (permissions, I/O error) is skipped too.
    return f"cannot read: {e.strerror or e}"


def verify_files(source, image_size: int, workdir: str | None, workers: int
                 ) -> dict[int, str]:
  """Decodes every item of `source` once; returns {index: reason} of the failures.

  Runs in `workers` threads: Pillow releases the GIL while it decodes and resizes, so
  threads use every core (see the benchmark's decode figures) and, unlike a process
  pool, never re-import the caller's __main__ nor fork a process that runs JAX.
  Verdicts are cached in WORKDIR/verified_files.json by path and (size, mtime), so a
  second run decodes only new or changed files.
  """
  cache_path = os.path.join(workdir, VERIFY_CACHE_FILE) if workdir else None
  cache: dict = {}
  if cache_path and os.path.exists(cache_path):
    try:
      with open(cache_path) as f:
        cache = json.load(f)
    except (OSError, ValueError):
      cache = {}  # A damaged cache only costs a re-check.
  results: dict[int, str | None] = {}
  todo = []
  for index in range(len(source)):
    key, stamp = source.key(index), source.stamp(index)
    hit = cache.get(key)
    if hit and hit[0] == stamp:
      results[index] = hit[1]
    else:
      todo.append((index, key, stamp))
  if todo:
    # Tiny decodes are enough to tell good from broken; draft mode makes JPEGs fast.
    check = lambda index: _check_one(source, index, min(image_size, 32))
    if workers > 1 and len(todo) > 64:
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(check, [index for index, _, _ in todo], chunksize=16))
    else:
      reasons = [check(index) for index, _, _ in todo]
    for (index, key, stamp), reason in zip(todo, reasons):
      results[index] = reason
      cache[key] = [stamp, reason]
    if cache_path:
      tmp = cache_path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(cache, f)
      os.replace(tmp, cache_path)
  return {index: reason for index, reason in results.items() if reason is not None}


def _split(source, seed: int, val_fraction: float):
  train, val = [], []
  for index, path in enumerate(source.paths):
    (val if split_fraction(seed, path) < val_fraction else train).append(index)
  return train, val


def drop_broken(source, image_size: int, cache_dir: str | None, workers: int
                ) -> tuple[object, tuple[dict, ...]]:
  """(`source` without the files that fail to decode, {"path", "reason"} of each of them).

  `cache_dir` keeps the verdicts (verified_files.json); None keeps none.
  """
  broken = verify_files(source, image_size, cache_dir, workers)
  skipped = tuple({"path": source.key(i), "reason": broken[i]} for i in sorted(broken))
  return source.subset([i for i in range(len(source)) if i not in broken]), skipped


def split_listed(source, class_names: Sequence[str], data_config, *, seed: int,
                 workdir: str | None, workers: int) -> Dataset:
  """Verifies every file of a listed `source`, skips the broken ones, and splits it."""
  kept, skipped = drop_broken(source, data_config.image_size, workdir, workers)
  write_skipped(skipped, workdir)
  for label, name in enumerate(class_names):
    if label not in kept.labels:
      raise DataError(f"Class '{name}' has no readable images left after skipping "
                      f"{len(skipped)} broken file(s) (see skipped_files.jsonl). Add "
                      "readable images to it.")
  train, val = _split(kept, seed, data_config.val_fraction)
  for split_name, split in (("training", train), ("validation", val)):
    if not split:
      raise DataError(f"The {split_name} split of '{data_config.source}' is empty "
                      f"({len(kept)} images, data.val_fraction="
                      f"{data_config.val_fraction}). Add images or change data.val_fraction.")
  return Dataset(kept.subset(train), kept.subset(val), tuple(class_names), skipped)
