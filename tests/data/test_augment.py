"""On-device augmentation: deterministic per RNG, active when on, identity when off."""

import jax
import numpy as np

from jaxcls.data import augment


def _images(n=6, size=16):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_same_rng_same_images_other_rng_other_images():
  images = _images()
  settings = dict(flip=True, rotation=15.0, scale=(0.85, 1.15))
  a = augment.augment(jax.random.key(1), images, **settings)
  b = augment.augment(jax.random.key(1), images, **settings)
  c = augment.augment(jax.random.key(2), images, **settings)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_augmentation_changes_images_when_on():
  images = _images()
  out = np.asarray(augment.augment(jax.random.key(3), images, flip=True, rotation=15.0,
                                   scale=(0.85, 1.15)))
  assert out.dtype == np.float32 and out.shape == images.shape
  changed = [not np.allclose(out[i], images[i]) for i in range(len(images))]
  assert all(changed)  # Every image gets its own non-zero rotation and zoom.
  assert 0.0 <= out.min() and out.max() <= 255.0


def test_off_leaves_images_untouched():
  images = _images()
  out = np.asarray(augment.augment(jax.random.key(4), images, flip=False, rotation=0.0,
                                   scale=(1.0, 1.0)))
  np.testing.assert_array_equal(out, images.astype(np.float32))


def test_flip_alone_equals_np_flip():
  images = _images(n=32)
  out = np.asarray(augment.augment(jax.random.key(5), images, flip=True, rotation=0.0,
                                   scale=(1.0, 1.0)))
  flipped = [np.array_equal(o, np.flip(i, axis=1).astype(np.float32))
             for o, i in zip(out, images)]
  kept = [np.array_equal(o, i.astype(np.float32)) for o, i in zip(out, images)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 5 < sum(flipped) < 27  # About half are mirrored.


def test_rotation_and_zoom_path_without_angle_or_zoom_is_the_identity():
  # The resampling path itself (not the shortcut) must not move pixels at angle 0, zoom 1.
  images = _images(n=2).astype(np.float32)
  out = jax.vmap(augment._resample)(images, np.zeros(2, np.float32),
                                    np.ones(2, np.float32), np.zeros(2, bool))
  np.testing.assert_allclose(np.asarray(out), images, atol=1e-3)
