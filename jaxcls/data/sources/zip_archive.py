"""`zip:PATH`: the folder layout inside a .zip, read in place by random access; nothing is
extracted. A member whose name is absolute or contains `..` is ignored (and counted in
the log); a member that inflates to more than 256 MB is skipped as a possible zip bomb.
"""

from __future__ import annotations

import logging
import os
import threading
import zipfile
from typing import Sequence

from jaxcls.data import preprocess
from jaxcls.data.sources import listed
from jaxcls.data.sources.base import DataError, digest, register
from jaxcls.data.sources.held_out import register_held_out

# A zip member that inflates to more than this is refused before it is read: a small
# archive must not make a run allocate gigabytes.
MAX_MEMBER_BYTES = 256 * 1024 * 1024

log = logging.getLogger("jaxcls")


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

  @property
  def root(self) -> str:
    """The archive and the folder of the classes inside it, e.g. `pets.zip/PetImages`."""
    prefix = self.members[0][:-len(self.paths[0])].rstrip("/") if self.paths else ""
    return os.path.join(self.archive, prefix) if prefix else self.archive

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
    return digest(["zip", self.archive, self.members, self.labels, self.stamps])


def _safe_parts(name: str) -> list[str] | None:
  """The "/"-separated parts of a member name, or None if it could leave the archive."""
  name = name.replace("\\", "/")
  if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
    return None
  parts = name.split("/")
  if any(part == ".." for part in parts):
    return None
  return [part for part in parts if part not in ("", ".")]


def list_zip(archive: str, min_classes: int = 2) -> tuple[ZipSource, tuple[str, ...]]:
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
  _, found, class_names = listed.index_classes([p for p, _ in safe], archive, min_classes)
  picked = [safe[pos][1] for _, _, pos in found]
  source = ZipSource(archive, [i.filename for i in picked], [path for path, _, _ in found],
                     [label for _, label, _ in found],
                     [f"{i.file_size}:{i.CRC:08x}" for i in picked],
                     [i.file_size for i in picked])
  return listed.check_classes(source, class_names, archive), class_names


@register("zip")
def build(arg: str, data_config, *, seed: int, workdir: str | None, workers: int):
  source, class_names = list_zip(os.path.expanduser(arg))
  return listed.split_listed(source, class_names, data_config, seed=seed, workdir=workdir,
                             workers=workers)


@register_held_out("zip")
def held_out(arg: str, data_config, split: None):
  del data_config, split  # An archive is listed whole, at any image size.
  archive = os.path.expanduser(arg)
  if not os.path.isfile(archive):
    raise DataError(f"Zip file '{archive}' does not exist. Evaluate on a .zip holding "
                    "one folder per class named like the model's classes.")
  return list_zip(archive, min_classes=1)
