"""Classify images with an ONNX model written by `jaxcls-export --format onnx`.

Needs only onnxruntime, numpy and Pillow (pip install onnxruntime numpy pillow): no
jax, jaxcls or flax. The model file holds the weights and, in its metadata, the class
names and image size. The preprocessing is jaxcls's, in `_preprocess.py` next to this
file.

    python predict_onnx.py model.onnx IMAGE [IMAGE ...]

Prints one JSON object per image: its path, the most probable class and the
probability of every class (or the path and an error). Exits with 1 if any image could
not be read, 2 if the model cannot be used.
"""

import json
import sys

import onnxruntime

from _preprocess import load_all


def open_model(model_path):
  """(an ONNX Runtime session, the metadata jaxcls wrote: each value is JSON text)."""
  session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
  props = session.get_modelmeta().custom_metadata_map
  if "class_names" not in props or "image_size" not in props:
    raise ValueError(f"{model_path} has no class_names and image_size in its metadata; "
                     "write it with jaxcls-export --format onnx.")
  return session, {key: json.loads(value) for key, value in props.items()}


def main(model_path, image_paths, batch_size=64):
  try:
    session, meta = open_model(model_path)
  except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors share no base class.
    print(f"error: cannot use {model_path}: {e}", file=sys.stderr)
    return 2
  classes, size = meta["class_names"], meta["image_size"]
  failed = 0
  for start in range(0, len(image_paths), batch_size):
    paths = image_paths[start:start + batch_size]
    loaded, images, errors = load_all(paths, size)  # uint8 [N, size, size, 3]
    outputs = (session.run(["probabilities", "labels"], {"images": images}) if loaded
               else ([], []))
    results = dict(zip(loaded, zip(*outputs)))
    for path in paths:
      if path in errors:
        failed += 1
        print(json.dumps({"path": path, "error": errors[path]}))
        continue
      probs, label = results[path]
      print(json.dumps({"path": path, "label": classes[int(label)],
                        "probabilities": dict(zip(classes, probs.tolist()))}))
  return 1 if failed else 0


if __name__ == "__main__":
  if len(sys.argv) < 3:
    sys.exit(__doc__)
  sys.exit(main(sys.argv[1], sys.argv[2:]))
