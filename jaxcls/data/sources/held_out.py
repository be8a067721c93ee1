"""Held-out sets: every example of a source, none split off, labelled in a model's classes.

Training splits a folder or zip into train and validation (`build_dataset`); a held-out
set is all evaluation. `build_held_out("folder:DIR", ...)` lists every image below the
class folders of DIR, decodes each once and leaves out those that fail (returned in
`skipped`, {"path", "reason"} as training lists them), and labels every example by its
class *name* in the classes a model was trained on: a set may hold some of the model's
classes only, and a class the model does not know is an error naming it. `tfds:NAME`
takes one split (`test`, `train[80%:]`) and, as in training, is not re-verified.

A kind offers held-out sets by registering a lister, which lists without decoding:

    @register_held_out("kind")
    def lister(arg, data_config, split) -> (source, class names of the source)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

from jaxcls.data.sources import listed
from jaxcls.data.sources.base import DataError, Source, digest, worker_count


@dataclasses.dataclass(frozen=True)
class HeldOut:
  source: Source  # Every readable example; labels index `class_names`.
  class_names: tuple[str, ...]  # The model's classes (the set's own when none given).
  data_class_names: tuple[str, ...]  # The classes the set holds, as it names them.
  skipped: tuple[dict, ...] = ()  # {"path", "reason"} of each file left out.


@dataclasses.dataclass(frozen=True)
class HeldOutKind:
  lister: Callable  # (arg, data_config, split) -> (source, class names); decodes nothing.
  verify: bool  # Decode every example once and skip the broken ones (files, members).
  splits: bool  # Takes a split (TFDS); a folder or a zip is evaluated whole.


# kind → how to list one of its held-out sets.
HELD_OUT_KINDS: dict[str, HeldOutKind] = {}


def register_held_out(kind: str, *, verify: bool = True, splits: bool = False):
  """Decorator: `build_held_out("kind:ARG")` lists the set with the function."""
  def wrap(fn):
    HELD_OUT_KINDS[kind] = HeldOutKind(fn, verify, splits)
    return fn
  return wrap


class RelabelledSource:
  """`source` with its labels mapped to another class list; everything else as is."""

  def __init__(self, source, mapping: Sequence[int]):
    self.source = source  # The report reads pictures through `.source`, as for a cache.
    self.mapping = tuple(mapping)  # mapping[label in source] = label in the new classes.

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = dict(self.source[index])
    record["label"] = self.mapping[record["label"]]
    return record

  @property
  def root(self) -> str:
    return self.source.root

  @property
  def paths(self) -> Sequence[str]:
    return self.source.paths

  @property
  def labels(self) -> tuple[int, ...]:
    return tuple(self.mapping[label] for label in self.source.labels)

  @property
  def identity(self) -> str:
    return digest(["relabelled", self.source.identity, self.mapping])


def class_mapping(data_classes: Sequence[str], model_classes: Sequence[str],
                  spec: str) -> tuple[int, ...]:
  """The model's index of each class of the set, matched by name."""
  unknown = [name for name in data_classes if name not in model_classes]
  if unknown:
    raise DataError(
        f"data '{spec}' holds classes the model was not trained on: "
        f"{_first_few(unknown)}. The model knows {_first_few(model_classes)}; labels are "
        "matched by class name, so rename those class folders to the model's names or "
        "remove them.")
  return tuple(model_classes.index(name) for name in data_classes)


def _first_few(names: Sequence[str], shown: int = 8) -> str:
  """Names for one error line: an ImageNet model knows 1,000."""
  listed = ", ".join(repr(n) for n in names[:shown])
  return listed if len(names) <= shown else f"{listed}, … ({len(names)} in all)"


def _kind(spec: str, split: str | None) -> tuple[HeldOutKind, str]:
  kind, _, arg = spec.partition(":")
  if kind not in HELD_OUT_KINDS:
    hint = (f" For this folder: folder:{spec}." if os.path.isdir(spec) else
            f" For this archive: zip:{spec}." if os.path.isfile(spec) else "")
    raise DataError(f"data '{spec}' is not understood. Use folder:PATH (one subfolder "
                    "per class), zip:PATH (the same inside a .zip) or tfds:NAME with a "
                    f"split (held-out kinds: {', '.join(sorted(HELD_OUT_KINDS))}).{hint}")
  entry = HELD_OUT_KINDS[kind]
  if split and not entry.splits:
    raise DataError(f"data '{spec}' is evaluated whole; a split ('{split}') applies only "
                    "to tfds: sets. Leave the split out.")
  if entry.splits and not split:
    raise DataError(f"data '{spec}' needs a split to evaluate, e.g. test or "
                    "train[80%:].")
  return entry, arg


def build_held_out(spec: str, data_config, *, class_names: Sequence[str] | None = None,
                   split: str | None = None, cache_dir: str | None = None,
                   workers: int | None = None) -> HeldOut:
  """Every readable example of `spec` ("KIND:ARG"), labelled in `class_names`.

  `data_config` gives the image size the verification decodes at and the TFDS data
  folder; `cache_dir`, if set, keeps the verdicts (verified_files.json) for next time.
  """
  entry, arg = _kind(spec, split)
  source, data_classes = entry.lister(arg, data_config, split)
  data_classes = tuple(data_classes)
  model_classes = tuple(class_names) if class_names is not None else data_classes
  mapping = class_mapping(data_classes, model_classes, spec)  # Before decoding anything.
  skipped: tuple[dict, ...] = ()
  if entry.verify:
    source, skipped = listed.drop_broken(source, data_config.image_size, cache_dir,
                                         worker_count(workers or data_config.workers))
    if not len(source):
      raise DataError(f"data '{spec}': none of its {len(skipped)} image file(s) can be "
                      f"decoded (first: {skipped[0]['path']}: {skipped[0]['reason']}).")
  if mapping != tuple(range(len(data_classes))):
    source = RelabelledSource(source, mapping)
  return HeldOut(source, model_classes, data_classes, skipped)
