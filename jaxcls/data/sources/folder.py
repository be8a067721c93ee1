"""`folder:PATH`: one subfolder per class (class names sorted), images anywhere below.

The class folders sit at the top, or one level down when the top holds a single folder
(`PetImages/Cat`, `PetImages/Dog`). Only files with an image extension (any letter case)
are listed; hidden files and `__MACOSX/` are ignored.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from jaxcls.data.sources import listed
from jaxcls.data.sources.base import IMAGE_EXTENSIONS, DataError, digest, register
from jaxcls.data.sources.held_out import register_held_out


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
    return digest(["folder", self.root, self.paths, self.labels,
                    self.stamps or [self.stamp(i) for i in range(len(self))]])


def list_folder(root: str, min_classes: int = 2) -> tuple[FileSource, tuple[str, ...]]:
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
  prefix, found, class_names = listed.index_classes(files, root, min_classes)
  class_root = os.path.join(root, *prefix)
  for name in sorted(os.listdir(class_root)):
    if (name not in class_names and listed.visible([name])
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
  return listed.check_classes(source, class_names, class_root), class_names


@register("folder")
def build(arg: str, data_config, *, seed: int, workdir: str | None, workers: int):
  source, class_names = list_folder(os.path.expanduser(arg))
  return listed.split_listed(source, class_names, data_config, seed=seed, workdir=workdir,
                             workers=workers)


@register_held_out("folder")
def held_out(arg: str, data_config, split: None):
  del data_config, split  # A folder is listed whole, at any image size.
  root = os.path.expanduser(arg)
  if not os.path.isdir(root):
    raise DataError(f"Image folder '{root}' does not exist. Evaluate on a folder with "
                    "one subfolder per class named like the model's classes.")
  return list_folder(root, min_classes=1)
