"""The pmapped steps: device-count independence and exact evaluation."""

import functools
import hashlib

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from numerics import (TINY_CNN_LAYERS, agreement, assert_normwise_close, displacement,
                      mean_loss_bound, normwise_error, tiny_cnn_training)
from jaxcls import config as config_lib
from jaxcls import parallel, steps, train
from jaxcls.data import augment, preprocess, sources
from jaxcls.models import create_model


def _setup(num_classes=2, **overrides):
  config = tiny_config("generated:shapes", **overrides)
  model = create_model(config.model, num_classes, axis_name=parallel.AXIS)
  state = steps.create_train_state(config, model, steps.root_key(0), steps_per_epoch=10)
  return config, model, state


def _step_on(devices, state, batch, rng, options=steps.StepOptions()):
  step = jax.pmap(functools.partial(steps.train_step, options=options),
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


def test_class_weights_and_label_smoothing_same_on_8_devices_and_1():
  """The weighted loss is normalised by the whole batch's sum of weights, so each device's
  share of the gradient is its share of that one mean, whatever the devices' own sums."""
  _, _, state = _setup()
  batch = _batch(seed=5)
  weights = (1.0, 3.0)
  per_device = np.asarray(weights)[batch["label"]].reshape(8, 2).sum(axis=1)
  assert len(set(per_device)) > 1, "the test needs devices whose weights sum differently"
  options = steps.StepOptions(label_smoothing=0.1, class_weights=weights)
  key = steps.root_key(1)
  state8, metrics8 = _step_on(jax.local_devices(), state, batch, key, options)
  state1, metrics1 = _step_on(jax.local_devices()[:1], state, batch, key, options)
  # As in the unweighted test above: the same sums in other orders.
  tolerance = tiny_cnn_training(1)
  assert abs(metrics8["loss"][0] - metrics1["loss"][0]) <= tolerance * metrics1["loss"][0]
  start = jax.device_get((state.params, state.batch_stats))
  assert_normwise_close(displacement(jax.device_get((state8.params, state8.batch_stats)),
                                     start),
                        displacement(jax.device_get((state1.params, state1.batch_stats)),
                                     start), tolerance, "8 devices against 1, weighted")


class _DrawsProbe(nn.Module):
  """A model that keeps what the train step fed it in its batch statistics, which the
  step hands back per device, unaveraged: the augmented images and a dropout mask."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    images = images.astype(jnp.float32)
    seen = self.variable("batch_stats", "images", jnp.zeros, images.shape, jnp.float32)
    mask = self.variable("batch_stats", "dropout", jnp.zeros, (images.shape[0], 64),
                         jnp.float32)
    if train and not self.is_initializing():
      seen.value = images
      mask.value = nn.Dropout(0.5, deterministic=False)(jnp.ones_like(mask.value))
    return nn.Dense(2, name="head")(images.mean(axis=(1, 2)))


def test_train_step_draws_differ_per_step_and_device_and_repeat_exactly():
  """Every device gets the same two images: what the model saw (augmented images, dropout
  mask) must differ between devices and between steps, and be the same bytes for the
  same seed, step and device."""
  probe = _DrawsProbe()
  one = _batch(n=2, size=8, seed=2)
  variables = probe.init(jax.random.key(0), one["image"])
  state = steps.TrainState.create(apply_fn=steps.apply_model(probe),
                                  params=variables["params"], tx=optax.sgd(0.1),
                                  batch_stats=variables["batch_stats"])
  options = steps.StepOptions(augment=augment.Options(flip=True, rotation=30.0,
                                                      crop_area=(0.5, 1.0)))
  every = {k: np.concatenate([v] * 8) for k, v in one.items()}

  devices = jax.local_devices()
  step = jax.pmap(functools.partial(steps.train_step, options=options),
                  axis_name=parallel.AXIS, devices=devices, in_axes=(0, 0, None))

  def seen(state, seed):
    new, _ = step(parallel.replicate(state, devices), parallel.shard(every, 8),
                  steps.root_key(seed))
    per_device = jax.device_get(new.batch_stats)
    # Each draw as a digest of its bytes: equal digests, equal bytes.
    return parallel.unreplicate(new), [
        {k: hashlib.sha256(v[d].tobytes()).hexdigest() for k, v in per_device.items()}
        for d in range(8)]

  after_first, first = seen(state, seed=1)
  for name in ("images", "dropout"):
    assert len({device[name] for device in first}) == 8, f"{name}: a draw per device"
  _, second = seen(after_first, seed=1)
  for d in range(8):
    for name in ("images", "dropout"):
      assert second[d][name] != first[d][name], f"{name}: device {d}, a draw per step"
  _, again = seen(state, seed=1)
  assert again == first
  _, other_seed = seen(state, seed=2)
  assert all(o["dropout"] != f["dropout"] for o, f in zip(other_seed, first))


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


def _one_device_step(state, batch, options):
  step = jax.pmap(functools.partial(steps.train_step, options=options),
                  axis_name=parallel.AXIS, devices=jax.local_devices()[:1],
                  in_axes=(0, 0, None))
  new, metrics = step(parallel.replicate(state, jax.local_devices()[:1]),
                      parallel.shard(batch, 1), steps.root_key(1))
  return parallel.unreplicate(new), jax.device_get(metrics)


def _batch(n=16, size=16, classes=2, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          "label": rng.integers(0, classes, (n,)).astype(np.int32),
          "mask": np.ones((n,), bool)}


def test_accumulated_micro_batches_give_the_full_batch_update():
  """4 micro-batches of 4 against one batch of 16: the same mean gradient, so the same
  update to float32 rounding. Batch norm aside: the backbone's batch norm runs on its
  running statistics here (backbone_bn_train=False), which no batch changes."""
  config = tiny_config("generated:shapes")
  model = create_model(config.model, 2, axis_name=parallel.AXIS, backbone_bn_train=False)
  state = steps.create_train_state(config, model, steps.root_key(0), steps_per_epoch=10)
  batch = _batch()
  # Class weights too: the micro-batches' weights sum differently, and each is a share
  # of the whole batch's weighted mean.
  for weights in ((), (1.0, 3.0)):
    whole, whole_metrics = _one_device_step(state, batch,
                                            steps.StepOptions(class_weights=weights))
    micro, micro_metrics = _one_device_step(
        state, batch, steps.StepOptions(accumulate=4, class_weights=weights))
    # Forward and backward through the tiny CNN; the longest sum is the first layer's
    # weight gradient over 16 × 16 × 16 pixels, then 4 micro-batches added.
    assert abs(micro_metrics["loss"][0] - whole_metrics["loss"][0]) <= (
        tiny_cnn_training(1) * whole_metrics["loss"][0])
    assert micro_metrics["accuracy"][0] == whole_metrics["accuracy"][0]
    start = jax.device_get(state.params)
    assert_normwise_close(displacement(jax.device_get(micro.params), start),
                          displacement(jax.device_get(whole.params), start),
                          tiny_cnn_training(1), f"accumulated against whole, {weights}")
  # With batch norm in training mode they differ (statistics of 4 against 16 images).
  trained_bn = create_model(config.model, 2, axis_name=parallel.AXIS)
  bn_state = steps.create_train_state(config, trained_bn, steps.root_key(0), 10)
  a, _ = _one_device_step(bn_state, batch, steps.StepOptions())
  b, _ = _one_device_step(bn_state, batch, steps.StepOptions(accumulate=4))
  assert normwise_error(b.params["head"]["kernel"] - bn_state.params["head"]["kernel"],
                        a.params["head"]["kernel"] - bn_state.params["head"]["kernel"]) > 1e-3


def test_accumulation_updates_batch_norm_statistics_once_per_step():
  """k micro-batches make one update of the running statistics, with the mean of their
  batch statistics: running ← m·running + (1 − m)·mean_j(stat_j) (m = 0.9), not m
  applied k times."""
  config = tiny_config("generated:shapes")
  model = create_model(config.model, 2, axis_name=parallel.AXIS)
  state = steps.create_train_state(config, model, steps.root_key(0), steps_per_epoch=10)
  batch = _batch()
  new, _ = _one_device_step(state, batch, steps.StepOptions(accumulate=4))
  # Each micro-batch's own update of the running statistics, from the state's, in plain
  # flax on one device; the rule's mean of them is m·running + (1 − m)·mean_j(stat_j).
  plain = create_model(config.model, 2)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  updates = [plain.apply(variables, batch["image"][4 * j:4 * j + 4], train=True,
                         mutable=["batch_stats"])[1]["batch_stats"] for j in range(4)]
  expected = jax.tree.map(lambda *u: np.mean(np.asarray(u, np.float64), axis=0), *updates)
  # Two computations of the micro-batches' statistics (the step's CPU layers, plain
  # flax): the longest sums are the first layer's statistics over 4 × 16 × 16 pixels.
  assert_normwise_close(jax.device_get(new.batch_stats), expected,
                        agreement(TINY_CNN_LAYERS, 4 * 16 * 16), "running statistics")


def test_class_weights_weigh_each_example_by_its_class():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  labels = jnp.array([0, 1, 1])
  per_example = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  weighted = float(steps.loss_fn(logits, labels, class_weights=(1.0, 3.0)))
  assert weighted == pytest.approx((per_example[0] + 3 * per_example[1:].sum()) / 7,
                                   rel=1e-6)
  # Soft targets (mixup): the weight is the targets' mix of the class weights.
  soft = jnp.array([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
  soft_losses = np.asarray(optax.softmax_cross_entropy(logits, soft))
  weights = np.array([2.0, 3.0, 1.0])
  assert float(steps.loss_fn(logits, soft, class_weights=(1.0, 3.0))) == pytest.approx(
      float(np.sum(weights * soft_losses) / weights.sum()), rel=1e-6)


def test_label_smoothing_leaves_the_class_weights_alone():
  """Each example weighs its label's class weight; smoothing changes its target only."""
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  labels = jnp.array([0, 1, 1])
  smoothed = optax.smooth_labels(jax.nn.one_hot(labels, 2), 0.2)
  per_example = np.asarray(optax.softmax_cross_entropy(logits, smoothed), np.float64)
  weights = np.array([1.0, 3.0, 3.0])
  got = float(steps.loss_fn(logits, labels, label_smoothing=0.2, class_weights=(1.0, 3.0)))
  # A weighted mean of three float32 losses: a few roundings of numbers below 2.
  assert got == pytest.approx(np.sum(weights * per_example) / weights.sum(), rel=1e-6)


def test_mixup_trains_on_mixed_images_against_soft_targets():
  """The step's loss is the soft-target cross-entropy of the model on the mixed images
  (the key derived as train_step derives it), not the loss of the images as given."""
  config, _, state = _setup()
  model = create_model(config.model, 2)  # The same model, its batch norm on one device.
  batch = _batch()
  options = steps.StepOptions(mix=augment.MixOptions(mixup_alpha=0.4))
  _, metrics = _one_device_step(state, batch, options)
  rng = jax.random.fold_in(jax.random.fold_in(steps.root_key(1), 0), 0)  # Step 0, device 0.
  _, mix_rng, dropout_rng = jax.random.split(rng, 3)
  images = jnp.asarray(batch["image"], jnp.float32)
  mixed, targets = augment.mix(mix_rng, images, jnp.asarray(batch["label"]), 2, options.mix)
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def losses_on(x, y):
    logits, _ = model.apply(variables, x, train=True, rngs={"dropout": dropout_rng},
                            mutable=["batch_stats"])
    return np.asarray(logits), np.asarray(optax.softmax_cross_entropy(logits, y))

  logits, losses = losses_on(mixed, targets)
  bound = mean_loss_bound(logits, losses)
  assert abs(metrics["loss"][0] - losses.mean()) <= bound
  _, unmixed = losses_on(images, jax.nn.one_hot(batch["label"], 2))
  assert abs(unmixed.mean() - losses.mean()) > 10 * bound


def test_balanced_class_weights_come_from_the_training_split(shapes_dir):
  config = tiny_config(f"folder:{shapes_dir}", **{"train.balance_classes": True})
  dataset = sources.build_dataset(config.data, config.seed)
  counts = np.bincount(dataset.train.labels)
  weights = train._class_weights(config, dataset)
  np.testing.assert_allclose(weights, len(dataset.train.labels) / (2 * counts))
  config = tiny_config(f"folder:{shapes_dir}", **{"train.class_weights": (1.0, 2.0, 3.0)})
  with pytest.raises(config_lib.ConfigError, match="3 weights, but the data has 2 classes"):
    train._class_weights(config, dataset)


def test_the_weight_average_follows_every_step():
  config = tiny_config("generated:shapes", **{"optim.ema_decay": 0.75})
  model = create_model(config.model, 2, axis_name=parallel.AXIS)
  state = steps.create_train_state(config, model, steps.root_key(0), 10)
  assert state.ema is not None
  new, _ = _one_device_step(state, _batch(), steps.step_options(config))
  # At the first update (step 1) the warm-up decay (1 + 1) / (10 + 1) is below 0.75.
  decay = 2 / 11
  expected = jax.tree.map(lambda old, now: decay * np.asarray(old) + (1 - decay) * np.asarray(now),
                          {"params": state.params, "batch_stats": state.batch_stats},
                          {"params": new.params, "batch_stats": new.batch_stats})
  # Two float32 multiply-adds per element: within 2 ulps of the numbers involved.
  for got, want in zip(jax.tree.leaves(new.ema), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=4 * 2.0 ** -24, atol=1e-30)


def test_accumulation_must_divide_each_devices_share(shapes_dir, tmp_path):
  config = tiny_config(f"folder:{shapes_dir}", **{"train.accumulate_steps": 3})
  with pytest.raises(config_lib.ConfigError,
                     match=r"accumulate_steps=3 does not divide each device's 2 images"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
