"""Look at the data before training on it: counts, splits, skipped files, and a grid.

    python -m jaxcls.data.inspect --config configs/catdog.py [--config.KEY=VALUE ...] \
        --out grid.png [--workdir DIR] [--num 16]

Prints one JSON object (class names, examples per class in each split, split sizes, the
number of skipped files and where they are listed) and writes a grid of augmented
training examples, each titled with its class: exactly what the first training batch
looks like to the model, after on-device augmentation.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

from jaxcls import config as config_lib



def define_flags() -> dict:
  """Defined only when run as a program, so importing this module defines no flags."""
  found = {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Recipe file (configs/*.py); override keys with "
          "--config.KEY=VALUE.", lock_config=True),
      "out": flags.DEFINE_string("out", "grid.png", "Where to write the grid."),
      "workdir": flags.DEFINE_string(
          "workdir", None, "Where the verification cache and skipped_files.jsonl go "
          "(default: a new temporary folder). Give the training workdir to reuse its cache."),
      "num": flags.DEFINE_integer("num", 16, "How many training examples to draw."),
  }
  flags.mark_flags_as_required(["config"])
  return found


_FLAGS: dict = {}


def labels_of(source) -> list[int]:
  """Every label of a source; file sources know them without reading any image."""
  labels = getattr(source, "labels", None)
  if labels is not None:
    return list(labels)
  return [int(source[i]["label"]) for i in range(len(source))]


def summarize(dataset, workdir: str | None = None) -> dict:
  """Class names, per-class counts per split, split sizes, skipped count."""
  from jaxcls.data import sources  # pylint: disable=import-outside-toplevel
  summary = {"classes": list(dataset.class_names)}
  for split in ("train", "val"):
    labels = labels_of(getattr(dataset, split))
    summary[f"{split}_size"] = len(labels)
    summary[f"{split}_per_class"] = {name: labels.count(label)
                                     for label, name in enumerate(dataset.class_names)}
  summary["skipped"] = len(dataset.skipped)
  if workdir:
    summary["skipped_list"] = os.path.join(workdir, sources.SKIPPED_FILE)
  return summary


def augmented_examples(dataset, config, num: int):
  """(float32 [N, S, S, 3] augmented images, int labels) of the first training batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxcls.data import augment, loader  # pylint: disable=import-outside-toplevel
  num = max(1, min(num, len(dataset.train)))
  batch = next(loader.train_batches(dataset.train, batch_size=num,
                                    image_size=config.data.image_size, seed=config.seed,
                                    num_steps=1, workers=config.data.workers or 1))
  images = augment.augment(jax.random.key(config.seed), batch["image"],
                           flip=config.augment.flip, rotation=config.augment.rotation,
                           scale=tuple(config.augment.scale))
  return np.asarray(images), [int(label) for label in batch["label"]]


def write_grid(images, labels, class_names, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  cols = int(np.ceil(np.sqrt(len(images))))
  rows = int(np.ceil(len(images) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, image, label in zip(axes.flat, images, labels):
    ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
    ax.set_title(class_names[label], fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from jaxcls.data import sources  # pylint: disable=import-outside-toplevel
  from jaxcls.data.preprocess import ImageError  # pylint: disable=import-outside-toplevel
  config = _FLAGS["config"].value
  workdir = _FLAGS["workdir"].value or tempfile.mkdtemp(prefix="jaxcls-inspect-")
  try:
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    dataset = sources.build_dataset(config.data, config.seed, workdir)
    summary = summarize(dataset, workdir)
    images, labels = augmented_examples(dataset, config, _FLAGS["num"].value)
  except (config_lib.ConfigError, sources.DataError, ImageError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  write_grid(images, labels, dataset.class_names, _FLAGS["out"].value)
  summary["grid"] = os.path.abspath(_FLAGS["out"].value)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  _FLAGS.update(define_flags())
  app.run(main)
