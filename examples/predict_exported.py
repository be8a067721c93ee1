"""Classify images with a model written by `jaxcls-export`.

Needs only jax, numpy and Pillow (pip install jax flatbuffers numpy pillow): no jaxcls,
flax or optax. The model file holds the weights; MODEL.json next to it holds the class
names and image size.

    python predict_exported.py model.jaxexport IMAGE [IMAGE ...]

Prints one JSON object per image: its path, the most probable class and the
probability of every class.
"""

import json
import sys

import jax
import numpy as np
from PIL import Image, ImageOps


def to_rgb(img):
  """Any Pillow mode to RGB, as jaxcls does it: transparency over white, 16-bit scaled."""
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    values = np.asarray(img, dtype=np.float64)
    top = 255.0 if values.max(initial=0) <= 255 else 65535.0
    if img.mode == "F" and values.max(initial=0) <= 1.0:
      top = 1.0
    gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
  if img.mode == "P":
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
  return img.convert("RGB")


def load(path, size):
  """uint8 [size, size, 3]: upright, RGB, shorter side resized to `size`, centre crop."""
  img = Image.open(path)
  if img.format == "JPEG":
    img.draft("RGB", (size, size))  # Decode at reduced scale, exactly as training did.
  img.load()
  img = to_rgb(ImageOps.exif_transpose(img))
  img = ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
  return np.asarray(img, dtype=np.uint8)


def main(model_path, image_paths, batch_size=64):
  with open(model_path, "rb") as f:
    model = jax.export.deserialize(bytearray(f.read()))
  with open(model_path + ".json") as f:
    meta = json.load(f)
  classes, size = meta["class_names"], meta["image_size"]
  for start in range(0, len(image_paths), batch_size):
    paths = image_paths[start:start + batch_size]
    images = np.stack([load(path, size) for path in paths])  # uint8 [N, size, size, 3]
    probabilities = np.asarray(model.call(images))  # float32 [N, len(classes)]
    for path, probs in zip(paths, probabilities):
      print(json.dumps({"path": path, "label": classes[int(np.argmax(probs))],
                        "probabilities": dict(zip(classes, probs.tolist()))}))


if __name__ == "__main__":
  if len(sys.argv) < 3:
    sys.exit(__doc__)
  main(sys.argv[1], sys.argv[2:])
