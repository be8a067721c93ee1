"""`tfds:NAME`: a TensorFlow Datasets set read with `tfds.data_source` (ArrayRecord,
random access, no `tf.data`). Splits come from `data.train_split` / `data.val_split`,
class names from the set's ClassLabel feature. Images arrive still encoded and go
through the same `preprocess.load_image` as every other source. A set that is not
prepared yet is downloaded and prepared once (TensorFlow, CPU only, is needed then).
TFDS sets are not re-verified: TFDS checks and re-encodes them when it prepares them.
"""

from __future__ import annotations

import functools
import logging
import os

from jaxcls.data.sources.base import DataError, Dataset, digest, register, write_skipped
from jaxcls.data.sources.held_out import register_held_out

log = logging.getLogger("jaxcls")


class TfdsSource:
  """One split of a prepared TFDS set; images stay encoded until `preprocess`."""

  def __init__(self, name: str, split: str, data_dir: str, records, image_key: str,
               label_key: str):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.records = records  # What tfds.data_source returned.
    self.image_key, self.label_key = image_key, label_key

  def __len__(self) -> int:
    return len(self.records)

  @property
  def root(self) -> str:
    return f"tfds:{self.name}"

  def __getitem__(self, index: int) -> dict:
    record = self.records[int(index)]
    return {"data": record[self.image_key], "label": int(record[self.label_key]),
            "path": f"tfds:{self.name}/{self.split}[{index}]"}

  @property
  def identity(self) -> str:
    return digest(["tfds", self.name, self.split, self.data_dir, len(self)])

  @property
  def paths(self) -> tuple[str, ...]:
    """Record names, like FileSource.paths (for listings and fingerprints)."""
    return tuple(f"{self.split}[{i}]" for i in range(len(self)))

  @functools.cached_property
  def labels(self) -> tuple[int, ...]:
    """Every record's label; reads each record once (TFDS stores labels with images)."""
    return tuple(int(self.records[i][self.label_key]) for i in range(len(self)))


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


def open_splits(name: str, data_config, splits: dict[str, str]
                ) -> tuple[list[TfdsSource], tuple[str, ...]]:
  """The named splits of a TFDS set (prepared on first use) and its class names.

  `splits` maps what the user set (a config key, a flag) to the split, for messages.
  """
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

  def open_all():
    return [tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                             decoders=decoders) for split in splits.values()]

  try:
    records = open_all()
  except (NotImplementedError, AssertionError, FileNotFoundError) as e:
    if builder.is_prepared():  # E.g. prepared earlier as TFRecord by tfds.load.
      raise DataError(
          f"TFDS '{name}' in {builder.data_dir} cannot be read by random access ({e}). "
          "jaxcls needs it prepared as ArrayRecord: set data.tfds_data_dir to an empty "
          "folder (or delete that one) and it is prepared again.") from None
    prepare_tfds(builder, name)
    records = open_all()
  except ValueError as e:  # A split TFDS does not know, or bad slicing syntax.
    raise DataError(f"TFDS '{name}': {e}. Set {' and '.join(splits)} to splits the set "
                    "has, e.g. train[:80%], train[80%:].") from None
  opened = [TfdsSource(name, split, data_dir or "", r, image_key, label_key)
            for split, r in zip(splits.values(), records)]
  for what, source in zip(splits, opened):
    if len(source) == 0:
      raise DataError(f"TFDS '{name}' split '{source.split}' ({what}) is empty.")
  return opened, tuple(features[label_key].names)


def build_tfds(name: str, data_config) -> Dataset:
  """The train and val splits of a TFDS set, prepared on first use."""
  (train, val), class_names = open_splits(
      name, data_config, {"data.train_split": data_config.train_split,
                          "data.val_split": data_config.val_split})
  return Dataset(train, val, class_names)


@register("tfds")
def build(arg: str, data_config, *, seed: int, workdir: str | None, workers: int):
  del seed, workers  # TFDS fixes the splits and has verified the images.
  dataset = build_tfds(arg, data_config)
  write_skipped([], workdir)
  return dataset


@register_held_out("tfds", verify=False, splits=True)
def held_out(arg: str, data_config, split: str):
  """One whole split (e.g. `test`, `train[80%:]`); TFDS verified it when preparing."""
  (source,), class_names = open_splits(arg, data_config, {"the split": split})
  return source, class_names
