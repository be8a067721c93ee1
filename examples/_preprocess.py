"""jaxcls's preprocessing (jaxcls/data/preprocess.py) with Pillow and numpy alone, for
the example programs next to this file; tests/serve/test_onnx_export.py checks that it
gives the same bytes as `jaxcls.data.preprocess.load_image`."""

import warnings

import numpy as np
from PIL import Image, ImageOps

HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img):
  """Any Pillow mode to RGB, as jaxcls does it: transparency over white, 16-bit scaled."""
  if img.mode in HIGH_BIT_DEPTH_MODES:
    values = np.asarray(img, dtype=np.float64)
    top = 255.0 if values.max(initial=0) <= 255 else 65535.0
    if img.mode == "F" and values.max(initial=0) <= 1.0:
      top = 1.0
    gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
  if img.mode == "P":
    img = img.convert("RGBA")
  if img.mode in ALPHA_MODES:
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
  return img.convert("RGB")


def load(path, size):
  """uint8 [size, size, 3]: upright, RGB, shorter side resized to `size`, centre crop."""
  with warnings.catch_warnings():
    # Refused, as jaxcls refuses it: an image over Pillow's decompression-bomb limit.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    img = Image.open(path)
  if img.format == "JPEG":
    img.draft("RGB", (size, size))  # Decode at reduced scale, exactly as training did.
  img.load()
  img = to_rgb(ImageOps.exif_transpose(img))
  img = ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
  return np.asarray(img, dtype=np.uint8)


def load_all(paths, size):
  """(the paths that loaded, their images [N, size, size, 3], {path: why not} for the
  others): one unreadable file is reported, not a reason to stop."""
  loaded, images, errors = [], [], {}
  for path in paths:
    try:
      images.append(load(path, size))
      loaded.append(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
      errors[path] = f"cannot read: {e}"
  stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
  return loaded, stacked, errors
