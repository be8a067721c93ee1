"""Shared helpers for model tests: numpy-initialized states and one pmapped step."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import optim
from jaxcls.config import base_config
from jaxcls.models import create_model
from jaxcls.parallel import replicate
from jaxcls.data import augment
from jaxcls.steps import StepOptions, TrainState, apply_model, root_key, train_step

AXIS = "batch"


def numpy_variables(model, image_size: int, seed: int = 0) -> dict:
  """He-initialized variables drawn with numpy: skips compiling `model.init`, which
  takes most of a minute for ResNet-50 on a small CPU."""
  abstract = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.uint8))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
      return rng.normal(0.0, std, leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, dict(abstract))


def model_config(name: str, **overrides):
  config = base_config()
  config.model.name = name
  config.model.widths = (8, 16)
  config.model.dropout = 0.0
  for key, value in overrides.items():
    config.model[key] = value
  return config


def make_state(config, num_classes: int, image_size: int, seed: int = 0) -> TrainState:
  model = create_model(config.model, num_classes, axis_name=AXIS)
  variables = numpy_variables(model, image_size, seed)
  tx = optim.create_optimizer(config.optim, steps_per_epoch=10, num_epochs=1)
  return TrainState.create(apply_fn=apply_model(model), params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}))


def make_batch(num_devices: int, per_device: int, image_size: int, num_classes: int,
               seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  shape = (num_devices, per_device, image_size, image_size, 3)
  return {"image": rng.integers(0, 256, shape, dtype=np.uint8),
          "label": rng.integers(0, num_classes, shape[:2]).astype(np.int32),
          "mask": np.ones(shape[:2], bool)}


def one_step(state: TrainState, batch: dict, **options):
  """One pmapped step with a flip, and any other `StepOptions` field given."""
  devices = jax.local_devices()[:batch["label"].shape[0]]
  options = StepOptions(augment=augment.Options(flip=True), **options)
  step = jax.pmap(functools.partial(train_step, options=options),
                  axis_name=AXIS, devices=devices, in_axes=(0, 0, None))
  new, metrics = step(replicate(state, devices), batch, root_key(1))
  return jax.device_get(new), jax.device_get(metrics)


def check_synchronised_step(name: str) -> None:
  """One pmapped training step of model `name` on 8 devices, with real checks."""
  assert jax.local_device_count() == 8
  state = make_state(model_config(name), num_classes=3, image_size=32)
  new, metrics = one_step(state, make_batch(8, 2, 32, 3))
  loss = metrics["loss"]
  assert np.all(np.isfinite(loss)) and np.all(loss == loss[0]) and loss[0] > 0.1
  # Every device holds the same parameters and the same batch-norm statistics, although
  # each saw different images: gradients and statistics were averaged over all 8.
  for tree in (new.params, new.batch_stats):
    for leaf in jax.tree.leaves(tree):
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
  assert not np.array_equal(first(new.params)["head"]["kernel"], state.params["head"]["kernel"])
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(first(new.batch_stats)), jax.tree.leaves(state.batch_stats))]
  assert all(changed)
