"""Classify images with a model written by `jaxcls-export`.

Needs only jax, numpy and Pillow (pip install jax flatbuffers numpy pillow): no jaxcls,
flax or optax. The model file holds the weights; MODEL.json next to it holds the class
names and image size. The preprocessing is jaxcls's, in `_preprocess.py` next to this
file.

    python predict_exported.py model.jaxexport IMAGE [IMAGE ...]

Prints one JSON object per image: its path, the most probable class and the
probability of every class (or the path and an error). Exits with 1 if any image could
not be read, 2 if the model cannot be used.
"""

import json
import sys

import jax
import numpy as np

from _preprocess import load_all


def open_model(model_path):
  """(the deserialized model, the metadata jaxcls wrote beside it in MODEL.json)."""
  with open(model_path + ".json") as f:
    meta = json.load(f)
  if "class_names" not in meta or "image_size" not in meta:
    raise ValueError(f"{model_path}.json has no class_names and image_size; write the "
                     "model with jaxcls-export.")
  with open(model_path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read())), meta


def main(model_path, image_paths, batch_size=64):
  try:
    model, meta = open_model(model_path)
  except Exception as e:  # noqa: BLE001 - a missing file, bad JSON, not a jax.export file.
    print(f"error: cannot use {model_path}: {e}", file=sys.stderr)
    return 2
  classes, size = meta["class_names"], meta["image_size"]
  failed = 0
  for start in range(0, len(image_paths), batch_size):
    paths = image_paths[start:start + batch_size]
    loaded, images, errors = load_all(paths, size)  # uint8 [N, size, size, 3]
    probabilities = np.asarray(model.call(images)) if loaded else []  # float32 [N, C]
    results = dict(zip(loaded, probabilities))
    for path in paths:
      if path in errors:
        failed += 1
        print(json.dumps({"path": path, "error": errors[path]}))
        continue
      probs = results[path]
      print(json.dumps({"path": path, "label": classes[int(np.argmax(probs))],
                        "probabilities": dict(zip(classes, probs.tolist()))}))
  return 1 if failed else 0


if __name__ == "__main__":
  if len(sys.argv) < 3:
    sys.exit(__doc__)
  sys.exit(main(sys.argv[1], sys.argv[2:]))
