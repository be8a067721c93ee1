"""The pmapped steps: device-count independence and exact evaluation."""

import functools

import jax
import numpy as np
import pytest

from conftest import tiny_config
from numerics import assert_normwise_close, displacement, tiny_cnn_training
from jaxcls import parallel, steps, train
from jaxcls.data import loader, preprocess, sources
from jaxcls.models import create_model


def _setup(num_classes=2, **overrides):
  config = tiny_config("generated:shapes", **overrides)
  model = create_model(config.model, num_classes, axis_name=parallel.AXIS)
  state = steps.create_train_state(config, model, steps.root_key(0), steps_per_epoch=10)
  return config, model, state


def _step_on(devices, state, batch, rng):
  step = jax.pmap(functools.partial(steps.train_step, flip=False, rotation=0.0,
                                    scale=(1.0, 1.0)),
                  axis_name=parallel.AXIS, devices=devices, in_axes=(0, 0, None))
  new_state, metrics = step(parallel.replicate(state, devices),
                            parallel.shard(batch, len(devices)), rng)
  return parallel.unreplicate(new_state), jax.device_get(metrics)


def test_one_step_same_on_8_devices_and_1():
  assert jax.local_device_count() == 8
  config, _, state = _setup()
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
           "label": rng.integers(0, 2, (16,)).astype(np.int32),
           "mask": np.ones((16,), bool)}
  key = steps.root_key(1)
  state8, metrics8 = _step_on(jax.local_devices(), state, batch, key)
  state1, metrics1 = _step_on(jax.local_devices()[:1], state, batch, key)
  # The same sums in other orders (8 partial batches, then across devices): float32-close.
  tolerance = tiny_cnn_training(1)
  assert abs(metrics8["loss"][0] - metrics1["loss"][0]) <= tolerance * metrics1["loss"][0]
  start = jax.device_get((state.params, state.batch_stats))
  moved8 = displacement(jax.device_get((state8.params, state8.batch_stats)), start)
  moved1 = displacement(jax.device_get((state1.params, state1.batch_stats)), start)
  assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(moved1)), (
      "every parameter and statistic should move after one step")
  assert_normwise_close(moved8, moved1, tolerance, "8 devices against 1")


def test_dropout_rng_differs_per_device_and_step():
  """Same data on every device: with dropout, per-device gradients must differ."""
  config, _, state = _setup(**{"model.dropout": 0.5})
  one = {"image": np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8),
         "label": np.array([0, 1], np.int32), "mask": np.ones((2,), bool)}
  batch = {k: np.concatenate([v] * 8) for k, v in one.items()}

  def local_loss(state, batch, rng):
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                             jax.lax.axis_index(parallel.AXIS))
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=True, rngs={"dropout": rng},
                            mutable=["batch_stats"])[0]
    return logits

  devices = jax.local_devices()
  fn = jax.pmap(local_loss, axis_name=parallel.AXIS, in_axes=(0, 0, None))
  logits = np.asarray(fn(parallel.replicate(state, devices), parallel.shard(batch, 8),
                         steps.root_key(0)))
  assert len({logits[i].tobytes() for i in range(8)}) == 8


@pytest.mark.parametrize("num_devices", [1, 8])
def test_eval_is_exact_with_padding(shapes_dir, num_devices):
  """37 examples, batch 16: the last batch is padded and masked; nothing is lost."""
  config, model, state = _setup(**{"batch_size": 16})
  everything, _ = sources.list_folder(shapes_dir)
  pick = np.random.default_rng(3).choice(len(everything), 37, replace=False)
  source = everything.subset(pick)
  result = train.evaluate(state, source, config, devices=jax.local_devices()[:num_devices])

  images = np.stack([preprocess.load_image(f"{shapes_dir}/{p}", 16) for p in source.paths])
  eval_model = create_model(config.model, 2)
  logits = eval_model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            images, train=False)
  predicted = np.asarray(logits).argmax(-1)
  assert result["count"] == 37
  assert result["accuracy"] == np.sum(predicted == np.array(source.labels)) / 37
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  expected_loss = -log_probs[np.arange(37), np.array(source.labels)].mean()
  assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
