"""Bytes → uint8 [S, S, 3]: the one preprocessing function of training, eval and predict.

Decoding applies the EXIF orientation, turns any mode (grayscale, palette, CMYK, 16-bit,
with or without alpha) into RGB, and asks libjpeg to decode at reduced scale when the
image is much larger than needed. The image is resized so that its shorter side is S and
centre-cropped to S × S. Normalization happens later, on the device, inside the model.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from jaxcls.errors import JaxclsError

# A small file that claims to hold a huge image (a "decompression bomb") is refused
# before any pixel is allocated. 100 megapixels is more than any photo set needs.
MAX_PIXELS = 100_000_000

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageError(JaxclsError, ValueError):
  """An input that cannot be turned into an image; names the input and the reason."""

  def __init__(self, name: str, reason: str):
    super().__init__(f"{name}: {reason}")
    self.name = name
    self.reason = reason


class NotAnImageError(ImageError):
  """Bytes in no image format Pillow can read (the server answers 415)."""


class TooManyPixelsError(ImageError):
  """An image over MAX_PIXELS or Pillow's own limit: a possible decompression bomb."""


def _describe(src: ImageInput) -> str:
  if isinstance(src, (str, os.PathLike)):
    return os.fspath(src)
  return f"<{type(src).__name__}>"


def _open(src: ImageInput) -> Image.Image:
  if isinstance(src, Image.Image):
    return src
  if isinstance(src, np.ndarray):
    return _array_to_image(src)
  if isinstance(src, (bytes, bytearray, memoryview)):
    if len(src) == 0:
      raise ImageError("<bytes>", "empty (0 bytes)")
    return Image.open(io.BytesIO(src))
  path = os.fspath(src)
  if os.path.getsize(path) == 0:
    raise ImageError(path, "empty file (0 bytes)")
  with open(path, "rb") as f:
    return Image.open(io.BytesIO(f.read()))


def _array_to_image(array: np.ndarray) -> Image.Image:
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ImageError("<ndarray>", f"expected [H, W], [H, W, 1|3|4], got shape {array.shape}")
  if array.dtype != np.uint8:
    if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1.0:
      array = array * 255.0
    array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
  if array.shape[-1] == 1:
    return Image.fromarray(array[..., 0], "L")
  return Image.fromarray(array, "RGB" if array.shape[-1] == 3 else "RGBA")


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any Pillow mode → RGB. Transparent pixels are composited over white."""
  if img.mode == "RGB":
    return img
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    values = np.asarray(img, dtype=np.float64)
    top = 255.0 if values.max(initial=0) <= 255 else 65535.0
    if img.mode == "F" and values.max(initial=0) <= 1.0:
      top = 1.0
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, "L").convert("RGB")
  if img.mode == "P":
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def _unidentified_reason(src: ImageInput) -> str:
  """Why Pillow could not open `src`. Pillow says only "cannot identify image file", also
  for a format it knows but cannot read (a TIFF in a pixel mode it lacks, say); asking
  the plugins whose signature matches recovers their reason."""
  unknown = "not an image file Pillow can identify"
  try:
    if isinstance(src, (bytes, bytearray, memoryview)):
      data = bytes(src)
    else:
      with open(os.fspath(src), "rb") as f:
        data = f.read()
  except (OSError, TypeError):
    return unknown
  Image.init()
  for fmt, (factory, accept) in Image.OPEN.items():
    try:
      matches = accept(data[:16]) if accept else False
    except Exception:  # noqa: BLE001 - some checks raise struct.error on 3 bytes.
      matches = False
    if not matches or isinstance(matches, str):
      continue
    try:
      factory(io.BytesIO(data), "")
    except (SyntaxError, IndexError, TypeError, ValueError, OSError, EOFError) as e:
      return f"a {fmt} file Pillow cannot open: {e or type(e).__name__}"
  return unknown


def decode(src: ImageInput, draft_size: int | None = None) -> Image.Image:
  """Decodes fully (errors surface here, not later), upright and in RGB."""
  name = _describe(src)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = _open(src)
      width, height = img.size
      if width * height > MAX_PIXELS:
        raise TooManyPixelsError(name, f"{width}x{height} pixels is over the limit of "
                         f"{MAX_PIXELS:,} (possible decompression bomb)")
      if draft_size and img.format == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 scale while staying >= draft_size on both sides.
        img.draft("RGB", (draft_size, draft_size))
      img.load()
      img = ImageOps.exif_transpose(img)
      return _to_rgb(img)
  except ImageError:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise TooManyPixelsError(name, f"possible decompression bomb ({e})") from None
  except FileNotFoundError:
    raise ImageError(name, "no such file") from None
  except IsADirectoryError:
    raise ImageError(name, "is a folder, not a file") from None
  except PermissionError:
    raise ImageError(name, "permission denied") from None
  except Image.UnidentifiedImageError:
    raise NotAnImageError(name, _unidentified_reason(src)) from None
  except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as e:
    raise ImageError(name, f"cannot decode: {e}") from None


def load_image(src: ImageInput, image_size: int) -> np.ndarray:
  """Returns the uint8 [image_size, image_size, 3] array the model sees.

  `src` is a path, encoded bytes, a PIL image or an array ([H, W], [H, W, 1|3|4]).
  Raises ImageError (with the file name and reason) for anything undecodable.
  """
  img = decode(src, draft_size=image_size)
  img = ImageOps.fit(img, (image_size, image_size), Image.Resampling.BILINEAR)
  return np.asarray(img, dtype=np.uint8)
