"""`generated:shapes`: a two-class image folder (discs and stripes) drawn with Pillow into
the workdir, so the whole pipeline runs offline."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from jaxcls.data.sources import folder, listed
from jaxcls.data.sources.base import DataError, register


def draw_shapes(root: str, per_class: int, seed: int, size: int = 64) -> None:
  """Writes a two-class folder, `disc/` and `stripes/`, as JPEG and PNG files.

  A disc is a filled circle; stripes are a square patch of parallel bars. Colours,
  sizes, positions, stripe direction and pixel noise are random, so the classes differ
  only in shape and texture.
  """
  rng = np.random.default_rng(seed)
  for name in ("disc", "stripes"):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      background = rng.integers(0, 256, 3)
      color = rng.integers(0, 256, 3)
      while np.abs(color - background).sum() < 200:
        color = rng.integers(0, 256, 3)
      half = rng.uniform(0.2, 0.35) * size
      cy, cx = rng.uniform(half + 1, size - half - 1, 2)
      ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
      if name == "disc":
        inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= half ** 2
      else:
        period = max(4.0, size / 8)
        along = xs if rng.random() < 0.5 else ys
        inside = ((np.abs(ys - cy) <= half) & (np.abs(xs - cx) <= half)
                  & ((along // (period / 2)) % 2 == 0))
      pixels = np.where(inside[..., None], color, background).astype(np.float64)
      pixels += rng.normal(0, 10, pixels.shape)
      image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
      ext = "jpg" if i % 2 == 0 else "png"
      image.save(os.path.join(root, name, f"{name}_{i:04d}.{ext}"))


def _generated_folder(arg: str, data_config, workdir: str | None, seed: int) -> str:
  if arg != "shapes":
    raise DataError(f"data.source 'generated:{arg}': the only generated set is "
                    "'generated:shapes'.")
  if not workdir:
    raise DataError("data.source 'generated:shapes' needs a workdir to draw into.")
  root = os.path.join(workdir, "generated_shapes")
  marker = os.path.join(root, ".complete")
  if not os.path.exists(marker):
    draw_shapes(root, data_config.generated_per_class, seed)
    open(marker, "w").close()
  return root



@register("generated")
def build(arg: str, data_config, *, seed: int, workdir: str | None, workers: int):
  source, class_names = folder.list_folder(_generated_folder(arg, data_config, workdir,
                                                             seed))
  return listed.split_listed(source, class_names, data_config, seed=seed, workdir=workdir,
                             workers=workers)
