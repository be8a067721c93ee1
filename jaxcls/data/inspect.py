"""Look at the data before training on it: counts, splits, skipped files, and a grid.

    jaxcls-inspect --config configs/catdog.py [--config.KEY=VALUE ...] \
        --out grid.png [--workdir DIR] [--num 16]

(the program is `jaxcls/cli/inspect.py`) prints one JSON object (class names, examples
per class in each split, split sizes, the number of skipped files and where they are
listed) and writes a grid of augmented training examples, each titled with its class:
exactly what the first training batch looks like to the model, after on-device
augmentation.
"""

from __future__ import annotations

import os


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
                           augment.Options.from_config(config.augment))
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
