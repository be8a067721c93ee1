"""On-device augmentation: random flip, rotation and zoom, inside the jitted train step.

Images arrive as uint8 and leave as float32 in [0, 255]; normalization is the model's
first layer, so training, evaluation and predict normalize identically. Rotation and zoom
are one affine resampling (bilinear, reflecting at the borders). A flip alone is an exact
mirror: `augment(..., flip=True, rotation=0, scale=(1, 1))` equals `np.flip` for the
images it flips.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy import ndimage


def _resample(image: jnp.ndarray, angle: jnp.ndarray, zoom: jnp.ndarray,
              flip: jnp.ndarray) -> jnp.ndarray:
  """Samples `image` [H, W, C] at output pixels mapped back through the affine map."""
  height, width, _ = image.shape
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - cy,
                        jnp.arange(width, dtype=jnp.float32) - cx, indexing="ij")
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_x = (cos * xs + sin * ys) / zoom
  src_y = (-sin * xs + cos * ys) / zoom
  src_x = jnp.where(flip, -src_x, src_x)
  coords = [src_y + cy, src_x + cx]

  def channel(c):
    return ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect")

  return jnp.stack([channel(c) for c in range(image.shape[-1])], axis=-1)


def augment(rng: jax.Array, images: jnp.ndarray, *, flip: bool, rotation: float,
            scale: tuple[float, float]) -> jnp.ndarray:
  """Randomly flips, rotates (±`rotation` degrees) and zooms (`scale`) each image.

  Args:
    rng: PRNG key; each image draws its own values from it.
    images: [B, H, W, C] uint8 or float.
    flip, rotation, scale: static settings (Python values).
  Returns:
    float32 [B, H, W, C] in the input's value range.
  """
  images = images.astype(jnp.float32)
  batch = images.shape[0]
  flip_rng, angle_rng, zoom_rng = jax.random.split(rng, 3)
  flips = (jax.random.bernoulli(flip_rng, 0.5, (batch,)) if flip
           else jnp.zeros((batch,), bool))
  geometric = rotation > 0 or tuple(scale) != (1.0, 1.0)
  if not geometric:
    mirrored = images[:, :, ::-1, :]
    return jnp.where(flips[:, None, None, None], mirrored, images)
  max_angle = jnp.deg2rad(rotation)
  angles = jax.random.uniform(angle_rng, (batch,), minval=-max_angle, maxval=max_angle)
  zooms = jax.random.uniform(zoom_rng, (batch,), minval=scale[0], maxval=scale[1])
  return jax.vmap(_resample)(images, angles, zooms, flips)
