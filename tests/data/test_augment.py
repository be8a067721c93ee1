"""On-device augmentation: deterministic per key, active when on, identity when off; the
random resized crop, the RandAugment and TrivialAugment operations, mixup and cutmix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from jaxcls.data import augment

Options = augment.Options


def _images(n=6, size=16):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_same_key_same_images_other_key_other_images():
  images = _images()
  options = Options(flip=True, rotation=15.0, scale=(0.85, 1.15), crop_area=(0.5, 1.0),
                    policy="randaugment")
  a = augment.augment(jax.random.key(1), images, options)
  b = augment.augment(jax.random.key(1), images, options)
  c = augment.augment(jax.random.key(2), images, options)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_augmentation_changes_images_when_on():
  images = _images()
  out = np.asarray(augment.augment(jax.random.key(3), images,
                                   Options(flip=True, rotation=15.0, scale=(0.85, 1.15))))
  assert out.dtype == np.float32 and out.shape == images.shape
  changed = [not np.allclose(out[i], images[i]) for i in range(len(images))]
  assert all(changed)  # Every image gets its own non-zero rotation and zoom.
  assert 0.0 <= out.min() and out.max() <= 255.0


def test_off_leaves_images_untouched():
  images = _images()
  out = np.asarray(augment.augment(jax.random.key(4), images, Options()))
  np.testing.assert_array_equal(out, images.astype(np.float32))


def test_flip_alone_equals_np_flip():
  images = _images(n=32)
  out = np.asarray(augment.augment(jax.random.key(5), images, Options(flip=True)))
  flipped = [np.array_equal(o, np.flip(i, axis=1).astype(np.float32))
             for o, i in zip(out, images)]
  kept = [np.array_equal(o, i.astype(np.float32)) for o, i in zip(out, images)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 5 < sum(flipped) < 27  # About half are mirrored.


def test_the_resampling_path_with_the_identity_map_moves_no_pixel():
  # The path itself (not the shortcut) at angle 0, zoom 1, full crop: bilinear weights
  # of exactly 0 and 1, so the pixels come back exact.
  images = _images(n=2).astype(np.float32)
  out = jax.vmap(lambda x: augment._resample(x, jnp.eye(2), jnp.zeros(2)))(images)
  np.testing.assert_array_equal(np.asarray(out), images)


def test_a_random_resized_crop_is_a_box_of_the_image_resized():
  """On a linear ramp, a crop resized by bilinear sampling stays a ramp: its corners
  show where the box was, within the range the crop settings allow."""
  size = 33
  ramp = np.broadcast_to(np.arange(size, dtype=np.float32)[None, :, None] * 7,
                         (8, size, size, 3))
  out = np.asarray(augment.augment(jax.random.key(6), ramp,
                                   Options(crop_area=(0.25, 0.25), crop_ratio=(1.0, 1.0))))
  for image in out:
    row = image[size // 2, :, 0] / 7  # Source columns sampled along a row.
    np.testing.assert_allclose(np.diff(row), 0.5, atol=1e-4)  # A box of half the side.
    assert 0 - 1e-4 <= row[0] and row[-1] <= size - 1 + 1e-4
  starts = {round(float(image[0, 0, 0]) / 7, 3) for image in out}
  assert len(starts) > 4  # The boxes sit in different places.


def _one_op(name, image, magnitude, sign=1.0):
  out = augment._colour(jnp.asarray(image, jnp.float32), augment.OPS.index(name),
                        magnitude, sign)
  return np.asarray(out)


@pytest.mark.parametrize("name, pil", [
    ("brightness", lambda img, f: ImageEnhance.Brightness(img).enhance(f)),
    ("colour", lambda img, f: ImageEnhance.Color(img).enhance(f)),
    ("contrast", lambda img, f: ImageEnhance.Contrast(img).enhance(f)),
    ("sharpness", lambda img, f: ImageEnhance.Sharpness(img).enhance(f)),
])
def test_colour_operations_follow_pil(name, pil):
  """The factor 1 + 0.9·m of torchvision's RandAugment; PIL rounds to uint8 and takes
  the contrast's grey level as an integer, so results agree to about 1 level."""
  image = _images(n=1, size=24)[0]
  ours = _one_op(name, image, magnitude=0.5)
  theirs = np.asarray(pil(Image.fromarray(image), 1.45), np.float32)
  assert np.abs(ours - theirs).max() <= 1.5


def test_posterize_solarize_autocontrast_and_equalize():
  image = _images(n=1, size=24)[0]
  posterized = _one_op("posterize", image, magnitude=1.0)  # 4 bits.
  np.testing.assert_array_equal(posterized, (image // 16) * 16)
  solarized = _one_op("solarize", image, magnitude=0.5)  # Threshold 127.5.
  np.testing.assert_array_equal(solarized, np.where(image >= 127.5, 255 - image, image))
  dim = (image // 4 + 60).astype(np.uint8)
  stretched = _one_op("autocontrast", dim, magnitude=0.0)
  assert stretched.min() == 0 and stretched.max() == 255
  equalized = _one_op("equalize", dim, magnitude=0.0)
  np.testing.assert_array_equal(equalized, ImageOps.equalize(Image.fromarray(dim)))


def test_geometric_policy_operations_move_pixels_and_colour_ones_do_not():
  matrix, shift = augment._policy_geometry(augment.OPS.index("translate_x"), 1.0, 1.0,
                                           10, 20)
  np.testing.assert_allclose(matrix, np.eye(2))
  np.testing.assert_allclose(shift, [0.0, 0.45 * 20])
  matrix, _ = augment._policy_geometry(augment.OPS.index("shear_y"), 1.0, -1.0, 10, 10)
  np.testing.assert_allclose(matrix, [[1.0, -0.3], [0.0, 1.0]])
  matrix, shift = augment._policy_geometry(augment.OPS.index("equalize"), 1.0, 1.0, 10, 10)
  np.testing.assert_array_equal(matrix, np.eye(2))
  np.testing.assert_array_equal(shift, 0)


def test_randaugment_draws_policy_ops_operations_at_policy_magnitude():
  config = augment.Options.from_config(_augment_config(policy="randaugment", policy_ops=3,
                                                       policy_magnitude=15))
  ops, magnitudes, signs = augment._draw_policy(jax.random.key(4), 64, config)
  assert ops.shape == magnitudes.shape == signs.shape == (64, 3)
  np.testing.assert_array_equal(magnitudes, 0.5)  # 15 of 30.
  assert set(np.asarray(ops).ravel()) == set(range(len(augment.OPS)))
  trivial = augment.Options.from_config(_augment_config(policy="trivialaugment",
                                                        policy_ops=3))
  _, magnitudes, _ = augment._draw_policy(jax.random.key(4), 64, trivial)
  assert magnitudes.shape == (64, 1)  # One operation, whatever policy_ops says.
  assert 0 <= magnitudes.min() and magnitudes.max() < 1 and np.std(magnitudes) > 0.2


def test_a_larger_policy_magnitude_changes_images_more():
  """The same key draws the same operations; only their strength differs."""
  images = _images(n=32)
  change = {}
  for magnitude in (3, 27):
    out = augment.augment(jax.random.key(9), images,
                          Options(policy="randaugment", policy_magnitude=magnitude))
    change[magnitude] = float(np.mean(np.abs(np.asarray(out) - images)))
  assert change[27] > 2 * change[3]


def _augment_config(**overrides):
  from jaxcls.config import base_config
  config = base_config().augment
  config.update(overrides)
  return config


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_policies_keep_the_value_range_and_change_most_images(policy):
  images = _images(n=16)
  out = np.asarray(augment.augment(jax.random.key(7), images, Options(policy=policy)))
  assert out.shape == images.shape and 0 <= out.min() and out.max() <= 255
  assert sum(not np.allclose(o, i) for o, i in zip(out, images)) >= 12


def test_mixup_blends_images_and_targets_alike():
  images = jnp.asarray(_images(n=4), jnp.float32)
  labels = jnp.array([0, 1, 2, 1])
  mixed, targets = augment.mix(jax.random.key(8), images, labels, 3,
                               augment.MixOptions(mixup_alpha=0.4))
  lam = float(targets[0, 0])  # Image 0 (class 0) with image 3 (class 1).
  np.testing.assert_allclose(np.asarray(mixed[0]),
                             lam * images[0] + (1 - lam) * images[3], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(targets.sum(-1)), 1.0, rtol=1e-6)
  assert 0 < lam < 1 and float(targets[0, 1]) == pytest.approx(1 - lam)


def test_cutmix_pastes_a_box_and_targets_count_its_pixels():
  images = jnp.stack([jnp.zeros((16, 16, 3)), jnp.full((16, 16, 3), 255.0)])
  labels = jnp.array([0, 1])
  mixed, targets = augment.mix(jax.random.key(9), images, labels, 2,
                               augment.MixOptions(cutmix_alpha=1.0))
  pasted = float(np.mean(np.asarray(mixed[0]) == 255.0))  # Image 1's box in image 0.
  assert 0 < pasted < 1
  np.testing.assert_allclose(np.asarray(targets[0]), [1 - pasted, pasted], rtol=1e-6)


def test_without_mixing_targets_are_one_hot():
  images = jnp.zeros((2, 4, 4, 3))
  same, targets = augment.mix(jax.random.key(0), images, jnp.array([1, 0]), 2,
                              augment.MixOptions())
  assert same is images
  np.testing.assert_array_equal(np.asarray(targets), [[0, 1], [1, 0]])
