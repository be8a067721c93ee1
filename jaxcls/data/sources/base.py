"""The registry of data sources, the protocol they follow, and `build_dataset`.

`data.source` is "KIND:ARG": the kind picks a builder from `KINDS`, which returns the
train and validation splits. A builder is registered with `@register("kind")`, from any
file: a new kind of source is one new file (see `folder.py` for the simplest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Callable, Iterable, Protocol, Sequence

from jaxcls.errors import JaxclsError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
SKIPPED_FILE = "skipped_files.jsonl"

log = logging.getLogger("jaxcls")


class DataError(JaxclsError, ValueError):
  """The data set cannot be used as configured; says what to change."""


class Source(Protocol):
  """A random-access set of labelled images, still encoded (grain's random-access
  protocol, plus names). Items are what `preprocess.load_image` reads."""
  root: str  # What `paths` are relative to, for people: a folder, an archive, a TFDS set.
  paths: Sequence[str]  # One name per example, in order.
  labels: Sequence[int]

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict:  # {"data", "label", "path"}
    ...

  @property
  def identity(self) -> str:  # Changes when the examples change (names the disk cache).
    ...


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: Source
  val: Source
  class_names: tuple[str, ...]
  skipped: tuple[dict, ...] = ()  # {"path", "reason"} of each file left out.

  def fingerprint(self) -> bytes:
    """The same bytes wherever the same examples are listed (multi-host check)."""
    return json.dumps([list(self.train.paths), list(self.train.labels),
                       list(self.val.paths), list(self.val.labels),
                       list(self.class_names)]).encode()


# kind → builder(arg, data_config, *, seed, workdir, workers) → Dataset.
KINDS: dict[str, Callable[..., Dataset]] = {}


def register(kind: str):
  """Decorator: `data.source="kind:ARG"` calls the function to build the data set."""
  def wrap(fn):
    KINDS[kind] = fn
    return fn
  return wrap


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "QUOTA PERIOD" or "max PERIOD".


def cgroup_cpu_quota(path: str | None = None) -> float | None:
  """The CPUs' worth of time the cgroup allows (quota / period), or None without a limit."""
  try:
    with open(path or CGROUP_CPU_MAX) as f:
      quota, period = f.read().split()[:2]
  except (OSError, ValueError):
    return None
  if quota == "max" or float(period) <= 0:
    return None
  return float(quota) / float(period)


def usable_cpu_count(cpu_max_path: str | None = None) -> int:
  """The CPUs this process may use: its affinity mask, capped by the cgroup's CPU quota.

  os.cpu_count() counts the machine's cores; a container limited to 4 of 64 would start
  64 decode threads that then take turns.
  """
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cpus = os.cpu_count() or 1
  quota = cgroup_cpu_quota(cpu_max_path)
  if quota is not None:
    cpus = min(cpus, max(1, math.ceil(quota)))
  return max(1, cpus)


def worker_count(requested: int = 0) -> int:
  """Decode threads to use: `requested`, or one per CPU this process may use when 0."""
  return requested or usable_cpu_count()


def is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def digest(parts: Iterable) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(repr(part).encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


def write_skipped(skipped: Sequence[dict], workdir: str | None) -> None:
  """WORKDIR/skipped_files.jsonl lists the inputs left out (empty when none were)."""
  if workdir:
    with open(os.path.join(workdir, SKIPPED_FILE), "w") as f:
      for row in skipped:
        f.write(json.dumps(row) + "\n")
  if skipped:
    log.warning("Skipped %d unreadable image file(s); see %s", len(skipped),
                os.path.join(workdir or ".", SKIPPED_FILE))


def build_dataset(data_config, seed: int, workdir: str | None = None,
                  workers: int | None = None) -> Dataset:
  """The configured source's train and validation splits, cached if `data.cache` says.

  Broken files are skipped and written to WORKDIR/skipped_files.jsonl.
  """
  kind, _, arg = data_config.source.partition(":")
  if kind not in KINDS:
    raise DataError(
        f"data.source '{data_config.source}' is not understood. Use tfds:NAME (e.g. "
        "tfds:cats_vs_dogs), folder:PATH (one subfolder per class), zip:PATH (the same "
        f"inside a .zip) or generated:shapes (registered kinds: {', '.join(sorted(KINDS))}).")
  dataset = KINDS[kind](arg, data_config, seed=seed, workdir=workdir,
                        workers=workers or worker_count(data_config.workers))
  from jaxcls.data import cache  # pylint: disable=import-outside-toplevel
  wrap = lambda source: cache.cached(source, data_config.cache, data_config.image_size,
                                     workdir)
  return dataclasses.replace(dataset, train=wrap(dataset.train), val=wrap(dataset.val))
