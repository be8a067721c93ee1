"""Where examples come from, chosen by `data.source`.

- `tfds:NAME` — a TensorFlow Datasets set read with `tfds.data_source` (ArrayRecord,
  random access, no `tf.data`). Splits come from `data.train_split` / `data.val_split`,
  class names from the set's ClassLabel feature. Images arrive still encoded and go
  through the same `preprocess.load_image` as every other source. A set that is not
  prepared yet is downloaded and prepared once (TensorFlow, CPU only, is needed then).
- `folder:PATH` — one subfolder per class (class names sorted), images anywhere below.
- `zip:PATH` — the same layout inside a .zip, read in place by random access; nothing is
  extracted. The class folders may sit one level down (`PetImages/Cat/...`).
- `generated:shapes` — a two-class image folder drawn with Pillow into the workdir, so
  the whole pipeline runs offline.

Only files with an image extension (any letter case) are listed. Folder and zip sources
are split into train and validation by a hash of the file's path relative to the class
root (and the seed): a file's split never changes when other files are added, and a zip
splits exactly like the same folder extracted. Every listed file is decoded once before
training; those that fail are skipped and written to `WORKDIR/skipped_files.jsonl`. The
results are cached in the workdir keyed by path, size and modification time (CRC for zip
members), so a second run decodes only new or changed files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import zipfile
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from jaxcls.data import preprocess

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
SKIPPED_FILE = "skipped_files.jsonl"
VERIFY_CACHE_FILE = "verified_files.json"
# A zip member that inflates to more than this is refused before it is read: a small
# archive must not make a run allocate gigabytes.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
# Folders that archivers add and that never hold classes.
IGNORED_FOLDERS = frozenset({"__MACOSX"})

log = logging.getLogger("jaxcls")


class DataError(ValueError):
  """The data set cannot be used as configured; says what to change."""


def worker_count(requested: int = 0) -> int:
  """Decode threads to use: `requested`, or one per CPU core when it is 0."""
  return requested or os.cpu_count() or 1


def is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def split_fraction(seed: int, relative_path: str) -> float:
  """A number in [0, 1) fixed by the seed and the file's relative path alone."""
  digest = hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64


def _digest(parts: Iterable) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(repr(part).encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Random-access sources. Each has __len__ and __getitem__ → {"data", "label", "path"},
# where "data" is what `preprocess.load_image` takes (a path, bytes or an array).


@dataclasses.dataclass(frozen=True)
class FileSource:
  """Labelled image files under `root` (a grain-style random-access source)."""
  root: str
  paths: tuple[str, ...]  # Relative to root, "/"-separated below the class root.
  labels: tuple[int, ...]
  stamps: tuple[str, ...] = ()  # "size:mtime_ns" per file, when known.

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    path = os.path.join(self.root, self.paths[index])
    with open(path, "rb") as f:
      data = f.read()
    return {"data": data, "label": self.labels[index], "path": path}

  def key(self, index: int) -> str:
    return os.path.join(self.root, self.paths[index])

  def stamp(self, index: int) -> str:
    if self.stamps:
      return self.stamps[index]
    stat = os.stat(self.key(index))
    return f"{stat.st_size}:{stat.st_mtime_ns}"

  def subset(self, indices: Sequence[int]) -> "FileSource":
    pick = lambda values: tuple(values[i] for i in indices) if values else ()
    return FileSource(self.root, pick(self.paths), pick(self.labels), pick(self.stamps))

  @property
  def identity(self) -> str:
    """Changes when any file is added, removed, relabelled or modified."""
    return _digest(["folder", self.root, self.paths, self.labels,
                    self.stamps or [self.stamp(i) for i in range(len(self))]])


class ZipSource:
  """Members of a .zip archive, read in place by random access; nothing is extracted.

  Each thread (and each process, after a fork or unpickling) opens its own handle, so
  reads never share a file position.
  """

  def __init__(self, archive: str, members: Sequence[str], paths: Sequence[str],
               labels: Sequence[int], stamps: Sequence[str], sizes: Sequence[int]):
    self.archive = archive
    self.members = tuple(members)  # Member names exactly as stored in the archive.
    self.paths = tuple(paths)  # Relative to the class root, like FileSource.paths.
    self.labels = tuple(labels)
    self.stamps = tuple(stamps)  # "size:crc" of each member.
    self.sizes = tuple(sizes)  # Uncompressed bytes of each member.
    self._local = threading.local()

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state["_local"]
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._local = threading.local()

  def _zip(self) -> zipfile.ZipFile:
    handle = getattr(self._local, "handle", None)
    if handle is None or self._local.pid != os.getpid():
      handle = zipfile.ZipFile(self.archive)
      self._local.handle, self._local.pid = handle, os.getpid()
    return handle

  def __len__(self) -> int:
    return len(self.paths)

  def key(self, index: int) -> str:
    return os.path.join(self.archive, self.members[index])

  def stamp(self, index: int) -> str:
    return self.stamps[index]

  def __getitem__(self, index: int) -> dict:
    name = self.key(index)
    if self.sizes[index] > MAX_MEMBER_BYTES:
      raise preprocess.ImageError(name, f"inflates to {self.sizes[index]:,} bytes, over "
                                  f"the limit of {MAX_MEMBER_BYTES:,} (possible zip bomb)")
    try:
      data = self._zip().read(self.members[index])
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
      raise preprocess.ImageError(name, f"cannot read from the archive: {e}") from None
    return {"data": data, "label": self.labels[index], "path": name}

  def subset(self, indices: Sequence[int]) -> "ZipSource":
    pick = lambda values: [values[i] for i in indices]
    return ZipSource(self.archive, pick(self.members), pick(self.paths),
                     pick(self.labels), pick(self.stamps), pick(self.sizes))

  @property
  def identity(self) -> str:
    return _digest(["zip", self.archive, self.members, self.labels, self.stamps])


class TfdsSource:
  """One split of a prepared TFDS set; images stay encoded until `preprocess`."""

  def __init__(self, name: str, split: str, data_dir: str, records, image_key: str,
               label_key: str):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.records = records  # What tfds.data_source returned.
    self.image_key, self.label_key = image_key, label_key

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    record = self.records[int(index)]
    return {"data": record[self.image_key], "label": int(record[self.label_key]),
            "path": f"tfds:{self.name}/{self.split}[{index}]"}

  @property
  def identity(self) -> str:
    return _digest(["tfds", self.name, self.split, self.data_dir, len(self)])

  @property
  def paths(self) -> tuple[str, ...]:
    """Record names, like FileSource.paths (for listings and fingerprints)."""
    return tuple(f"{self.split}[{i}]" for i in range(len(self)))

  @functools.cached_property
  def labels(self) -> tuple[int, ...]:
    """Every record's label; reads each record once (TFDS stores labels with images)."""
    return tuple(int(self.records[i][self.label_key]) for i in range(len(self)))


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: object  # A random-access source (FileSource, ZipSource, TfdsSource, ...).
  val: object
  class_names: tuple[str, ...]
  skipped: tuple[dict, ...] = ()


# ---------------------------------------------------------------------------------------
# Listing: the same class layout rules for folders and zips.


def _safe_parts(name: str) -> list[str] | None:
  """The "/"-separated parts of a member name, or None if it could leave the archive."""
  name = name.replace("\\", "/")
  if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
    return None
  parts = name.split("/")
  if any(part == ".." for part in parts):
    return None
  return [part for part in parts if part not in ("", ".")]


def _visible(parts: Sequence[str]) -> bool:
  return not any(p.startswith(".") or p in IGNORED_FOLDERS for p in parts)


def index_classes(files: Iterable[Sequence[str]], where: str
                  ) -> tuple[list[str], list[tuple[str, int, int]], tuple[str, ...]]:
  """Finds the class folders among image files given as path parts.

  Returns (prefix parts of the class root, [(path below the class root, label, position
  in `files`)], sorted class names). The class root is the top level, or the single
  top folder when the classes sit one level down (PetImages/Cat, PetImages/Dog).
  """
  files = [(list(parts), pos) for pos, parts in enumerate(files)]
  images = [(p, pos) for p, pos in files if is_image_name(p[-1]) and _visible(p)]

  def classes_at(depth: int, prefix: list[str]) -> set[str]:
    return {p[depth] for p, _ in images if len(p) > depth + 1 and p[:depth] == prefix}

  prefix: list[str] = []
  top = classes_at(0, [])
  if len(top) == 1:
    (single,) = top
    if len(classes_at(1, [single])) >= 2:
      prefix = [single]
  class_names = tuple(sorted(classes_at(len(prefix), prefix)))
  if len(class_names) < 2:
    raise DataError(f"'{where}' has {len(class_names)} class folder(s) with images "
                    f"{list(class_names)}; a classifier needs at least two. Put each "
                    "class's images in its own folder (e.g. Cat/, Dog/), at the top or "
                    "one level down (PetImages/Cat/).")
  label_of = {name: label for label, name in enumerate(class_names)}
  depth = len(prefix)
  found = [("/".join(p[depth:]), label_of[p[depth]], pos) for p, pos in images
           if p[:depth] == prefix and len(p) > depth + 1]
  found.sort(key=lambda item: (item[1], item[0]))
  return prefix, found, class_names


def list_folder(root: str) -> tuple[FileSource, tuple[str, ...]]:
  """Every image file below the class folders of `root`, with sorted class names."""
  if not os.path.isdir(root):
    raise DataError(f"Image folder '{root}' does not exist. Point data.source at a folder "
                    "with one subfolder per class, e.g. folder:/data/PetImages.")
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    rel = os.path.relpath(dirpath, root)
    parts = [] if rel == "." else rel.split(os.sep)
    files.extend(parts + [f] for f in filenames)
  prefix, found, class_names = index_classes(files, root)
  class_root = os.path.join(root, *prefix)
  for name in sorted(os.listdir(class_root)):
    if (name not in class_names and _visible([name])
        and os.path.isdir(os.path.join(class_root, name))):
      raise DataError(f"Class folder '{os.path.join(class_root, name)}' holds no images "
                      f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}). Add images "
                      "or remove the folder.")
  paths = tuple(path for path, _, _ in found)
  stamps = []
  for path in paths:
    stat = os.stat(os.path.join(class_root, path))
    stamps.append(f"{stat.st_size}:{stat.st_mtime_ns}")
  source = FileSource(class_root, paths, tuple(l for _, l, _ in found), tuple(stamps))
  return _check_classes(source, class_names, class_root), class_names


def list_zip(archive: str) -> tuple[ZipSource, tuple[str, ...]]:
  """Every image member below the class folders inside `archive`."""
  if not os.path.isfile(archive):
    raise DataError(f"Zip file '{archive}' does not exist. Point data.source at a .zip "
                    "holding one folder per class, e.g. zip:/data/kagglecatsanddogs_5340.zip.")
  try:
    with zipfile.ZipFile(archive) as zf:
      infos = [info for info in zf.infolist() if not info.is_dir()]
  except (zipfile.BadZipFile, OSError) as e:
    raise DataError(f"'{archive}' is not a readable zip file ({e}). Check the download, "
                    "or use folder:PATH with the extracted images.") from None
  safe, unsafe = [], 0
  for info in infos:
    parts = _safe_parts(info.filename)
    if parts is None:
      unsafe += 1
    else:
      safe.append((parts, info))
  if unsafe:
    log.warning("Ignored %d member(s) of %s whose names are absolute or contain '..'.",
                unsafe, archive)
  _, found, class_names = index_classes([p for p, _ in safe], archive)
  picked = [safe[pos][1] for _, _, pos in found]
  source = ZipSource(archive, [i.filename for i in picked], [path for path, _, _ in found],
                     [label for _, label, _ in found],
                     [f"{i.file_size}:{i.CRC:08x}" for i in picked],
                     [i.file_size for i in picked])
  return _check_classes(source, class_names, archive), class_names


def _check_classes(source, class_names: Sequence[str], where: str):
  for label, name in enumerate(class_names):
    if label not in source.labels:
      raise DataError(f"Class '{name}' in '{where}' holds no images (extensions: "
                      f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case). Add images or "
                      "remove the folder.")
  return source


# ---------------------------------------------------------------------------------------
# Verification: decode everything once, cache the verdicts.


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


# ---------------------------------------------------------------------------------------
# TFDS.


def _import_tensorflow_cpu():
  """Imports TensorFlow for preparing only, with every accelerator hidden from it."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # No such devices, or TF was already initialized without them.
  return tf


def _offline_hint() -> str:
  return ("To use a local copy instead, point data.source at it: "
          "folder:/path/to/PetImages (one subfolder per class) or "
          "zip:/path/to/kagglecatsanddogs_5340.zip (read in place).")


def prepare_tfds(builder, name: str) -> None:
  """Downloads and prepares `builder` as ArrayRecord; TensorFlow (CPU) only here."""
  try:
    _import_tensorflow_cpu()
  except ImportError as e:
    raise DataError(
        f"TFDS '{name}' is not prepared yet, and preparing it needs TensorFlow ({e}). "
        "Install the CPU build once: pip install 'jaxcls[tfds]' (or pip install "
        f"tensorflow-cpu), then run again. {_offline_hint()}") from None
  log.info("Preparing TFDS '%s' in %s (download and conversion to ArrayRecord; once).",
           name, builder.data_dir)
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except
    # requests' ConnectionError, tfds' DownloadError, ... all mean the same to a user.
    raise DataError(
        f"Could not download and prepare TFDS '{name}' into {builder.data_dir}: "
        f"{type(e).__name__}: {e}. Without network access TFDS cannot fetch it. "
        f"{_offline_hint()}") from e


def _feature_keys(features, name: str) -> tuple[str, str]:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  image_key = label_key = None
  for key, feature in features.items():
    if image_key is None and isinstance(feature, tfds.features.Image):
      image_key = key
    if label_key is None and isinstance(feature, tfds.features.ClassLabel):
      label_key = key
  if image_key is None or label_key is None:
    raise DataError(f"TFDS '{name}' has features {list(features.keys())}; jaxcls needs "
                    "one Image and one ClassLabel feature.")
  return image_key, label_key


def build_tfds(name: str, data_config) -> Dataset:
  """The train and val splits of a TFDS set, prepared on first use."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = os.path.expanduser(data_config.tfds_data_dir) or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"data.source 'tfds:{name}': TFDS has no such data set ({e}). See "
                    "https://www.tensorflow.org/datasets/catalog for names.") from None
  features = builder.info.features
  image_key, label_key = _feature_keys(features, name)
  decoders = {image_key: tfds.decode.SkipDecoding()}  # Bytes: our preprocess decodes.

  def open_split(split: str):
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders=decoders)

  try:
    records = [open_split(s) for s in (data_config.train_split, data_config.val_split)]
  except (NotImplementedError, AssertionError, FileNotFoundError) as e:
    if builder.is_prepared():  # E.g. prepared earlier as TFRecord by tfds.load.
      raise DataError(
          f"TFDS '{name}' in {builder.data_dir} cannot be read by random access ({e}). "
          "jaxcls needs it prepared as ArrayRecord: set data.tfds_data_dir to an empty "
          "folder (or delete that one) and it is prepared again.") from None
    prepare_tfds(builder, name)
    records = [open_split(s) for s in (data_config.train_split, data_config.val_split)]
  except ValueError as e:  # A split TFDS does not know, or bad slicing syntax.
    raise DataError(f"TFDS '{name}': {e}. Set data.train_split / data.val_split, e.g. "
                    "train[:80%] and train[80%:].") from None
  train, val = (TfdsSource(name, split, data_dir or "", r, image_key, label_key)
                for split, r in zip((data_config.train_split, data_config.val_split),
                                    records))
  for split, source in (("data.train_split", train), ("data.val_split", val)):
    if len(source) == 0:
      raise DataError(f"TFDS '{name}' split '{source.split}' ({split}) is empty.")
  return Dataset(train, val, tuple(features[label_key].names))


# ---------------------------------------------------------------------------------------
# Generated data.


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


def _generated_folder(arg: str, data_config, workdir: str | None, seed: int) -> str:
  if arg != "shapes":
    raise DataError(f"data.source 'generated:{arg}': the only generated set is "
                    "'generated:shapes'.")
  if not workdir:
    raise DataError("data.source 'generated:shapes' needs a workdir to draw into.")
  root = os.path.join(workdir, "generated_shapes")
  marker = os.path.join(root, ".complete")
  if not os.path.exists(marker):
    draw_shapes(root, data_config.generated_per_class, seed)
    open(marker, "w").close()
  return root


# ---------------------------------------------------------------------------------------
# Building the data set.



def list_source(spec: str, data_config, workdir: str | None, seed: int):
  """(unverified source of every listed file, class names) for folder:/zip:/generated:."""
  kind, _, arg = spec.partition(":")
  if kind == "folder":
    return list_folder(os.path.expanduser(arg))
  if kind == "zip":
    return list_zip(os.path.expanduser(arg))
  if kind == "generated":
    return list_folder(_generated_folder(arg, data_config, workdir, seed))
  raise DataError(f"data.source '{spec}' is not understood. Use tfds:NAME (e.g. "
                  "tfds:cats_vs_dogs), folder:PATH (one subfolder per class), zip:PATH "
                  "(the same inside a .zip) or generated:shapes.")


def _write_skipped(skipped: Sequence[dict], workdir: str | None) -> None:
  if workdir:
    with open(os.path.join(workdir, SKIPPED_FILE), "w") as f:
      for row in skipped:
        f.write(json.dumps(row) + "\n")
  if skipped:
    log.warning("Skipped %d unreadable image file(s); see %s", len(skipped),
                os.path.join(workdir or ".", SKIPPED_FILE))


def _split(source, seed: int, val_fraction: float):
  train, val = [], []
  for index, path in enumerate(source.paths):
    (val if split_fraction(seed, path) < val_fraction else train).append(index)
  return train, val


def build_dataset(data_config, seed: int, workdir: str | None = None,
                  workers: int | None = None) -> Dataset:
  """Lists, verifies, splits and (if `data.cache` says so) caches the configured source.

  Broken files are skipped and written to WORKDIR/skipped_files.jsonl.
  """
  kind = data_config.source.partition(":")[0]
  if kind == "tfds":
    dataset = build_tfds(data_config.source.partition(":")[2], data_config)
    _write_skipped([], workdir)
    return _with_cache(dataset, data_config, workdir)
  source, class_names = list_source(data_config.source, data_config, workdir, seed)
  workers = workers or worker_count(data_config.workers)
  broken = verify_files(source, data_config.image_size, workdir, workers)
  skipped = tuple({"path": source.key(i), "reason": broken[i]} for i in sorted(broken))
  _write_skipped(skipped, workdir)
  kept = source.subset([i for i in range(len(source)) if i not in broken])
  for label, name in enumerate(class_names):
    if label not in kept.labels:
      raise DataError(f"Class '{name}' has no readable images left after skipping "
                      f"{len(skipped)} broken file(s) (see {SKIPPED_FILE}). Add readable "
                      "images to it.")
  train, val = _split(kept, seed, data_config.val_fraction)
  for split_name, split in (("training", train), ("validation", val)):
    if not split:
      raise DataError(f"The {split_name} split of '{data_config.source}' is empty "
                      f"({len(kept)} images, data.val_fraction="
                      f"{data_config.val_fraction}). Add images or change data.val_fraction.")
  dataset = Dataset(kept.subset(train), kept.subset(val), class_names, skipped)
  return _with_cache(dataset, data_config, workdir)


def _with_cache(dataset: Dataset, data_config, workdir: str | None) -> Dataset:
  from jaxcls.data import cache  # pylint: disable=import-outside-toplevel
  wrap: Callable = lambda source: cache.cached(source, data_config.cache,
                                               data_config.image_size, workdir)
  return dataclasses.replace(dataset, train=wrap(dataset.train), val=wrap(dataset.val))
