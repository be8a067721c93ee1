"""On-device augmentation, inside the jitted train step.

Images arrive as uint8 and leave as float32 in [0, 255]; normalization is the model's
first layer, so training, evaluation and predict normalize identically.

- Geometry: a random resized crop, zoom, rotation, horizontal flip and the geometric
  operations of RandAugment / TrivialAugment (shear, translate, rotate) are composed
  into one affine map per image and resampled once (bilinear, reflecting at the
  borders). A flip alone is an exact mirror: with everything else off, `augment` equals
  `np.flip` for the images it flips.
- Colour: the other operations of the policy (brightness, colour, contrast, sharpness,
  posterize, solarize, auto-contrast, equalize), per image, after the geometry.
- `mix` blends pairs of images of the batch, mixup (a weighted average) or cutmix (a
  pasted box), and returns the matching soft targets for the loss.

RandAugment applies `policy_ops` operations at one magnitude (`policy_magnitude` of 30,
torchvision's scale); TrivialAugment applies one, at a magnitude drawn per image. The
strongest setting of each operation follows torchvision's RandAugment: shear 0.3,
translate 45 % of the side, rotate 30°, colour factors 1 ± 0.9, posterize to 4 bits,
solarize from 255 down to 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

POLICIES = ("none", "randaugment", "trivialaugment")
# The policies' operations; the first five move pixels, the rest change colours.
GEOMETRIC_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate")
COLOUR_OPS = ("brightness", "colour", "contrast", "sharpness", "posterize", "solarize",
              "autocontrast", "equalize")
OPS = GEOMETRIC_OPS + COLOUR_OPS


@dataclasses.dataclass(frozen=True)
class Options:
  """What to do to each training image (static: part of the compiled step)."""
  flip: bool = False
  rotation: float = 0.0  # Max degrees either way.
  scale: tuple[float, float] = (1.0, 1.0)  # Min and max zoom.
  crop_area: tuple[float, float] = (1.0, 1.0)  # Random resized crop: share of the area.
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # ... and its aspect ratio range.
  policy: str = "none"
  policy_ops: int = 2
  policy_magnitude: int = 9  # Of 30.

  @classmethod
  def from_config(cls, augment_config) -> "Options":
    c = augment_config
    return cls(flip=bool(c.flip), rotation=float(c.rotation),
               scale=tuple(float(s) for s in c.scale),
               crop_area=tuple(float(s) for s in c.crop_area),
               crop_ratio=tuple(float(s) for s in c.crop_ratio), policy=c.policy,
               policy_ops=int(c.policy_ops), policy_magnitude=int(c.policy_magnitude))

  @property
  def resamples(self) -> bool:
    return (self.rotation > 0 or self.scale != (1.0, 1.0) or self.crop_area != (1.0, 1.0)
            or self.policy != "none")


@dataclasses.dataclass(frozen=True)
class MixOptions:
  """Mixup and cutmix (static). With both on, each batch uses one, at random."""
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0

  @property
  def active(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


# ------------------------------------------------------------------------ the geometry


def _crop_box(rng, height: int, width: int, options: Options):
  """(scale_y, scale_x, shift_y, shift_x) of a random resized crop, in pixels."""
  if options.crop_area == (1.0, 1.0):
    return jnp.float32(1.0), jnp.float32(1.0), jnp.float32(0.0), jnp.float32(0.0)
  area_rng, ratio_rng, y_rng, x_rng = jax.random.split(rng, 4)
  area = jax.random.uniform(area_rng, (), minval=options.crop_area[0],
                            maxval=options.crop_area[1])
  log_ratio = jax.random.uniform(ratio_rng, (), minval=math.log(options.crop_ratio[0]),
                                 maxval=math.log(options.crop_ratio[1]))
  ratio = jnp.exp(log_ratio)  # width / height of the crop.
  scale_y = jnp.minimum(jnp.sqrt(area / ratio), 1.0)
  scale_x = jnp.minimum(jnp.sqrt(area * ratio), 1.0)
  # The crop's centre, anywhere that keeps the crop inside the image.
  shift_y = jax.random.uniform(y_rng, (), minval=-1.0, maxval=1.0) * (1 - scale_y) * height / 2
  shift_x = jax.random.uniform(x_rng, (), minval=-1.0, maxval=1.0) * (1 - scale_x) * width / 2
  return scale_y, scale_x, shift_y, shift_x


def _policy_geometry(op, magnitude, sign, height: int, width: int):
  """(2×2 matrix, shift) in (y, x) for one policy operation (identity for colour ones)."""
  shear = 0.3 * magnitude * sign
  turn = jnp.deg2rad(30.0) * magnitude * sign
  cos, sin = jnp.cos(turn), jnp.sin(turn)
  one, zero = jnp.ones(()), jnp.zeros(())
  matrices = jnp.stack([
      jnp.eye(2),                                   # identity
      jnp.array([[one, zero], [shear, one]]),       # shear_x: x moves with y
      jnp.array([[one, shear], [zero, one]]),       # shear_y: y moves with x
      jnp.eye(2), jnp.eye(2),                       # translate_x, translate_y
      jnp.array([[cos, sin], [-sin, cos]])])        # rotate
  shift = 0.45 * magnitude * sign
  shifts = jnp.stack([jnp.zeros(2), jnp.zeros(2), jnp.zeros(2),
                      jnp.array([zero, shift * width]), jnp.array([shift * height, zero]),
                      jnp.zeros(2)])
  index = jnp.minimum(op, len(GEOMETRIC_OPS) - 1)
  is_geometric = op < len(GEOMETRIC_OPS)
  return (jnp.where(is_geometric, matrices[index], jnp.eye(2)),
          jnp.where(is_geometric, shifts[index], jnp.zeros(2)))


def _resample(image, matrix, shift):
  """Samples `image` [H, W, C] at A·p + shift for each centred output pixel p."""
  height, width, channels = image.shape
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - cy,
                        jnp.arange(width, dtype=jnp.float32) - cx, indexing="ij")
  src_y = matrix[0, 0] * ys + matrix[0, 1] * xs + shift[0] + cy
  src_x = matrix[1, 0] * ys + matrix[1, 1] * xs + shift[1] + cx

  def channel(c):
    return ndimage.map_coordinates(image[..., c], [src_y, src_x], order=1, mode="reflect")

  return jnp.stack([channel(c) for c in range(channels)], axis=-1)


def _geometry(rng, image, ops, magnitudes, signs, options: Options):
  """One image's composed affine map, applied in one resampling."""
  height, width, _ = image.shape
  crop_rng, angle_rng, zoom_rng, flip_rng = jax.random.split(rng, 4)
  scale_y, scale_x, shift_y, shift_x = _crop_box(crop_rng, height, width, options)
  max_angle = jnp.deg2rad(options.rotation)
  angle = jax.random.uniform(angle_rng, (), minval=-max_angle, maxval=max_angle)
  zoom = jax.random.uniform(zoom_rng, (), minval=options.scale[0], maxval=options.scale[1])
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Output pixel → flip → rotate and zoom → the policy's operations → the crop box.
  flip = jnp.where(options.flip & jax.random.bernoulli(flip_rng), -1.0, 1.0)
  matrix = jnp.array([[cos, sin], [-sin, cos]]) @ jnp.diag(jnp.stack([1.0, flip])) / zoom
  shift = jnp.zeros(2)
  for op, magnitude, sign in zip(ops, magnitudes, signs):
    op_matrix, op_shift = _policy_geometry(op, magnitude, sign, height, width)
    matrix, shift = op_matrix @ matrix, op_matrix @ shift + op_shift
  crop = jnp.diag(jnp.stack([scale_y, scale_x]))
  return _resample(image, crop @ matrix, crop @ shift + jnp.stack([shift_y, shift_x]))


# -------------------------------------------------------------------------- the colours


def _gray(image):
  return image @ jnp.array([0.299, 0.587, 0.114], jnp.float32)  # PIL's "L" weights.


def _blend(base, image, factor):
  return base + factor * (image - base)


def _smoothed(image):
  """PIL's SMOOTH kernel (3×3, centre 5, others 1, over 13), edges left as they are.

  The kernel is a 3×3 box plus 4 × the centre, and the box is separable: four shifted
  additions (elementwise work XLA fuses), not a convolution per image and channel.
  """
  rows = image[:-2] + image[1:-1] + image[2:]  # Sums over 3 rows.
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  inner = (box + 4.0 * image[1:-1, 1:-1]) / 13.0
  return image.at[1:-1, 1:-1].set(inner)


def _equalize(image):
  """PIL's ImageOps.equalize per channel: a value goes to (pixels below it + step / 2) /
  step, step being (pixels − those at the top value) / 255; nothing when step is 0.

  From a 256-bin histogram per channel (one pass and a 256-entry table), not by sorting
  the pixels: the same integers, at a small part of the cost.
  """
  channels = image.shape[-1]
  flat = jnp.clip(jnp.round(image.reshape(-1, channels)), 0, 255).astype(jnp.int32)
  counts = jax.vmap(lambda values: jnp.zeros(256, jnp.int32).at[values].add(1),
                    in_axes=1, out_axes=1)(flat)  # [256, C]
  below = jnp.cumsum(counts, axis=0) - counts  # Pixels under each value.
  top = 255 - jnp.argmax(counts[::-1] > 0, axis=0)  # The largest value present.
  at_top = jnp.take_along_axis(counts, top[None, :], axis=0)[0]
  step = (flat.shape[0] - at_top) // 255
  table = jnp.minimum((below + step // 2) // jnp.maximum(step, 1), 255)  # [256, C]
  equalized = jnp.take_along_axis(table, flat, axis=0)
  return jnp.where(step > 0, equalized, flat).astype(jnp.float32).reshape(image.shape)


def _colour(image, op, magnitude, sign):
  """One policy operation's colour change (nothing for the geometric ones).

  Written as selections between cheap per-pixel results, not `lax.switch`: under `vmap`
  a switch computes every branch into an image of its own and then picks, where these
  `where`s fuse into one pass over the pixels (half the time on CPU, measured).
  Brightness, colour, contrast and sharpness are one blend towards a per-op base.
  """
  kind = jnp.maximum(op - len(GEOMETRIC_OPS) + 1, 0)  # 0: not a colour operation.
  factor = 1.0 + 0.9 * magnitude * sign
  step = 2.0 ** jnp.round(4.0 * magnitude)  # Posterize to 8 − 4·magnitude bits.
  low, high = image.min(axis=(0, 1)), image.max(axis=(0, 1))
  gray = _gray(image)[..., None]
  base = jnp.where(kind == 2, gray,                        # colour
                   jnp.where(kind == 3, jnp.mean(gray),    # contrast
                             jnp.where(kind == 4, _smoothed(image), 0.0)))  # sharpness
  out = jnp.where((kind >= 1) & (kind <= 4), _blend(base, image, factor), image)
  out = jnp.where(kind == 5, jnp.floor(image / step) * step, out)         # posterize
  out = jnp.where(kind == 6, jnp.where(image >= 255.0 * (1 - magnitude),  # solarize
                                       255.0 - image, image), out)
  out = jnp.where(kind == 7, (image - low) * 255.0 / jnp.maximum(high - low, 1.0),
                  out)                                                      # autocontrast
  out = jnp.where(kind == 8, _equalize(image), out)
  return jnp.clip(out, 0.0, 255.0)


# ------------------------------------------------------------------------ the policies


def _draw_policy(rng, batch: int, options: Options):
  """Per image and slot: operation index, magnitude in [0, 1], sign ±1."""
  if options.policy == "none":
    return jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0)), jnp.zeros((batch, 0))
  slots = options.policy_ops if options.policy == "randaugment" else 1
  op_rng, magnitude_rng, sign_rng = jax.random.split(rng, 3)
  ops = jax.random.randint(op_rng, (batch, slots), 0, len(OPS))
  if options.policy == "randaugment":
    magnitudes = jnp.full((batch, slots), options.policy_magnitude / 30.0)
  else:
    magnitudes = jax.random.uniform(magnitude_rng, (batch, slots))
  signs = jnp.where(jax.random.bernoulli(sign_rng, 0.5, (batch, slots)), 1.0, -1.0)
  return ops, magnitudes, signs


def resize(images: jnp.ndarray, size: int) -> jnp.ndarray:
  """[B, H, W, C] → float32 [B, size, size, C]: bilinear, antialiased when shrinking
  (as Pillow resizes a photo), in the input's value range."""
  batch, _, _, channels = images.shape
  return jax.image.resize(images.astype(jnp.float32), (batch, size, size, channels),
                          "linear", antialias=True)


def augment(rng: jax.Array, images: jnp.ndarray, options: Options) -> jnp.ndarray:
  """Augments each image of [B, H, W, C] (uint8 or float) with its own random draws.

  Returns float32 [B, H, W, C] in the input's value range.
  """
  images = images.astype(jnp.float32)
  batch = images.shape[0]
  geometry_rng, policy_rng, flip_rng = jax.random.split(rng, 3)
  if options.policy not in POLICIES:
    raise ValueError(f"augment policy {options.policy!r}; use one of {POLICIES}.")
  if not options.resamples:  # A flip alone: an exact mirror, no resampling.
    flips = (jax.random.bernoulli(flip_rng, 0.5, (batch,)) if options.flip
             else jnp.zeros((batch,), bool))
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
  ops, magnitudes, signs = _draw_policy(policy_rng, batch, options)
  keys = jax.random.split(geometry_rng, batch)
  images = jax.vmap(lambda k, x, o, m, s: _geometry(k, x, o, m, s, options))(
      keys, images, ops, magnitudes, signs)
  for slot in range(ops.shape[1]):
    images = jax.vmap(_colour)(images, ops[:, slot], magnitudes[:, slot], signs[:, slot])
  return images


# -------------------------------------------------------------------------- mixing


def mix(rng: jax.Array, images: jnp.ndarray, labels: jnp.ndarray, num_classes: int,
        options: MixOptions) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Mixup or cutmix of each image with another of the batch: (images, soft targets).

  One mixing weight λ ~ Beta(α, α) per batch; image i is blended with image i+1 (the
  batch is already in random order). Cutmix pastes a box of area 1 − λ and uses the
  box's exact area (after clipping at the borders) for the targets.
  """
  onehot = jax.nn.one_hot(labels, num_classes)
  if not options.active:
    return images, onehot
  choice_rng, mixup_rng, cutmix_rng, box_rng = jax.random.split(rng, 4)
  partner_images, partner_onehot = jnp.roll(images, 1, axis=0), jnp.roll(onehot, 1, axis=0)
  mixed = []
  if options.mixup_alpha > 0:
    lam = jax.random.beta(mixup_rng, options.mixup_alpha, options.mixup_alpha)
    mixed.append((lam * images + (1 - lam) * partner_images,
                  lam * onehot + (1 - lam) * partner_onehot))
  if options.cutmix_alpha > 0:
    lam = jax.random.beta(cutmix_rng, options.cutmix_alpha, options.cutmix_alpha)
    inside, kept = _cutmix_box(box_rng, images.shape[1], images.shape[2], lam)
    mixed.append((jnp.where(inside[None, :, :, None], partner_images, images),
                  kept * onehot + (1 - kept) * partner_onehot))
  if len(mixed) == 1:
    return mixed[0]
  use_cutmix = jax.random.bernoulli(choice_rng, 0.5)
  return tuple(jnp.where(use_cutmix, b, a) for a, b in zip(*mixed))


def _cutmix_box(rng, height: int, width: int, lam):
  """A [H, W] mask of a box of area about 1 − λ, and the share of pixels left outside."""
  y_rng, x_rng = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  cy = jax.random.uniform(y_rng, (), minval=0, maxval=height)
  cx = jax.random.uniform(x_rng, (), minval=0, maxval=width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = ((jnp.abs(ys + 0.5 - cy) <= cut * height / 2)
            & (jnp.abs(xs + 0.5 - cx) <= cut * width / 2))
  return inside, 1.0 - jnp.mean(inside.astype(jnp.float32))
