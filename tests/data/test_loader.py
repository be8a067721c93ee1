"""Loader: order as a pure function of (seed, step), padding, caching, device prefetch."""

import threading

import numpy as np
import pytest

import jax

from jaxcls import parallel
from jaxcls.data import cache, loader, preprocess, sources


@pytest.fixture
def shapes_source(shapes_dir):
  source, _ = sources.list_folder(shapes_dir)
  return source  # 132 images, labels 0 then 1.


def _labels_and_pixels(batches):
  return [(b["label"].copy(), b["image"].copy()) for b in batches]


def test_resumed_mid_epoch_sees_the_same_next_batches(shapes_source):
  kwargs = dict(batch_size=16, image_size=16, seed=7, num_steps=17, workers=2)
  full = _labels_and_pixels(loader.train_batches(shapes_source, **kwargs))
  assert len(full) == 17  # 7 steps per epoch: crosses two epoch boundaries.
  for start in (3, 7, 10):  # Mid-epoch, at an epoch boundary, mid second epoch.
    resumed = _labels_and_pixels(loader.train_batches(shapes_source, start_step=start,
                                                      **kwargs))
    assert len(resumed) == 17 - start
    for (la, ia), (lb, ib) in zip(full[start:], resumed):
      np.testing.assert_array_equal(la, lb)
      np.testing.assert_array_equal(ia, ib)


def test_every_epoch_is_a_fresh_shuffle_without_repeats(shapes_source):
  steps_per_epoch = len(shapes_source) // 16
  order = loader.grain.MapDataset.range(len(shapes_source)).shuffle(seed=1)
  epochs = [[order[e * len(shapes_source) + i] for i in range(len(shapes_source))]
            for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(len(shapes_source)))
  assert epochs[0] != epochs[1]
  batches = list(loader.train_batches(shapes_source, batch_size=16, image_size=16, seed=1,
                                      num_steps=2 * steps_per_epoch))
  expected = [shapes_source.labels[i] for i in epochs[1][:16]]
  np.testing.assert_array_equal(batches[steps_per_epoch]["label"], expected)


def test_eval_batches_cover_everything_once_and_mask_the_padding(shapes_source):
  batches = list(loader.eval_batches(shapes_source, batch_size=32, image_size=16))
  assert len(batches) == 5  # 132 = 4 * 32 + 4.
  masks = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert masks.sum() == 132 and not masks[132:].any()
  np.testing.assert_array_equal(labels[:132], shapes_source.labels)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_cache_serves_the_same_pixels_and_decodes_each_image_once(
    shapes_source, kind, tmp_path, monkeypatch):
  kwargs = dict(batch_size=16, image_size=16, seed=2, num_steps=16, workers=2)
  plain = _labels_and_pixels(loader.train_batches(shapes_source, **kwargs))
  calls = []
  real = preprocess.load_image
  monkeypatch.setattr(preprocess, "load_image",
                      lambda src, size: calls.append(1) or real(src, size))
  cached = cache.cached(shapes_source, kind, 16, str(tmp_path))
  first_epoch = _labels_and_pixels(loader.train_batches(cached, **{**kwargs,
                                                                   "num_steps": 8}))
  decoded_in_epoch_one = len(calls)
  assert decoded_in_epoch_one == 8 * 16  # 128 of the 132 images seen once.
  rest = _labels_and_pixels(loader.train_batches(cached, start_step=8, **kwargs))
  assert len(calls) - decoded_in_epoch_one <= 132 - 128  # Only the 4 not seen yet.
  for (la, ia), (lb, ib) in zip(plain, first_epoch + rest):
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ia, ib)
  if kind == "disk":  # A later run reuses the files: nothing to decode at all.
    calls.clear()
    again = cache.cached(shapes_source, kind, 16, str(tmp_path))
    assert again.num_cached == cached.num_cached
    _labels_and_pixels(loader.train_batches(again, **{**kwargs, "num_steps": 7}))
    assert calls == []


def test_prefetch_to_devices_lays_batches_out_per_device(shapes_source):
  devices = jax.local_devices()[:4]
  host = list(loader.train_batches(shapes_source, batch_size=16, image_size=16, seed=0,
                                   num_steps=3))
  on_device = list(parallel.prefetch_to_devices(iter(host), devices, size=2))
  assert len(on_device) == 3
  for h, d in zip(host, on_device):
    assert d["image"].shape == (4, 4, 16, 16, 3) and d["image"].dtype == np.uint8
    assert {s.device for s in d["image"].addressable_shards} == set(devices)
    np.testing.assert_array_equal(np.asarray(d["image"]).reshape(h["image"].shape),
                                  h["image"])


class _ThreadRecordingSource:
  """The wrapped source, noting which thread read each example."""

  def __init__(self, source):
    self.source, self.threads = source, []

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    self.threads.append(threading.current_thread().name)
    return self.source[index]


def test_a_batch_is_decoded_by_the_shared_pool_and_is_the_same_for_any_pool_size(
    shapes_source):
  kwargs = dict(batch_size=16, image_size=16, seed=3, num_steps=9)
  one_thread = _labels_and_pixels(loader.train_batches(shapes_source, workers=1, **kwargs))
  recording = _ThreadRecordingSource(shapes_source)
  pooled = _labels_and_pixels(loader.train_batches(recording, workers=3, **kwargs))
  # Every image of every batch was read by a decode thread, not by grain's batch thread.
  assert len(recording.threads) == 9 * 16
  assert all(name.startswith("jaxcls-decode") for name in recording.threads)
  assert loader.decode_pool(3)._max_workers == 3  # pylint: disable=protected-access
  for (la, ia), (lb, ib) in zip(one_thread, pooled, strict=True):
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ia, ib)
  evaluated = [list(loader.eval_batches(shapes_source, batch_size=32, image_size=16,
                                        workers=w)) for w in (1, 3)]
  for a, b in zip(*evaluated, strict=True):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[key], b[key])
