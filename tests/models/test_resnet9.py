"""The flagship's pieces: the ResNet-9 backbone, flip test-time augmentation and
progressive resizing (configs/catdog.py)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls import train
from jaxcls.config import ConfigError, base_config, validate
from jaxcls.data import augment
from jaxcls.models import create_model
from jaxcls.steps import root_key
from model_utils import model_config
from numerics import agreement, normwise_error


def _variables(model, size=32):
  return jax.jit(model.init)(root_key(0), jnp.zeros((1, size, size, 3), jnp.uint8))


def test_resnet9_parameters_and_feature_width():
  config = model_config("resnet9", widths=(8, 16, 32, 64))
  model = create_model(config.model, 3)
  variables = _variables(model)
  # Convolutions 3·8·9 + 8·16·9 + 2·16·16·9 + 16·32·9 + 32·64·9 + 2·64·64·9 (no bias),
  # batch-norm scale and bias on each of their 8 layers, and the head 64·3 + 3.
  convs = 9 * (3 * 8 + 8 * 16 + 2 * 16 * 16 + 16 * 32 + 32 * 64 + 2 * 64 * 64)
  norms = 2 * (8 + 16 + 16 + 16 + 32 + 64 + 64 + 64)
  count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert count == convs + norms + 64 * 3 + 3
  assert variables["params"]["head"]["kernel"].shape == (64, 3)


def test_residual_blocks_start_as_the_identity():
  from jaxcls.models.resnet9 import ResidualPair
  block = ResidualPair(8)
  x = jax.random.uniform(jax.random.key(2), (2, 6, 6, 8))  # ≥ 0, as after a ReLU.
  variables = block.init(jax.random.key(0), x, train=False)
  # The second batch norm's scale is zero: the branch adds exactly 0 (its bias is 0 too).
  np.testing.assert_array_equal(block.apply(variables, x, train=False), x)
  assert not np.any(variables["params"]["BatchNorm_0"]["scale"])


def test_the_stride_4_stem_quarters_the_later_layers():
  config = model_config("resnet9", widths=(8, 16, 32, 64))
  s2 = create_model(config.model, 2)
  config.model.name = "resnet9_s4"
  s4 = create_model(config.model, 2)
  variables = _variables(s2, 64)
  # The same parameters; the stem's pooling makes 64 px cost what 32 px costs in s2.
  assert jax.tree.structure(variables) == jax.tree.structure(_variables(s4, 64))
  images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
  assert s4.apply(variables, images).shape == (1, 2)
  states = lambda model, size: model.apply(
      variables, jnp.zeros((1, size, size, 3), jnp.uint8), capture_intermediates=True,
      mutable=["intermediates"])[1]["intermediates"]["backbone"]["ConvNormReLU_1"]
  assert states(s4, 64)["__call__"][0].shape == states(s2, 32)["__call__"][0].shape


def test_resnet9_needs_four_widths():
  config = base_config()
  config.data.source = "generated:shapes"
  config.model.name = "resnet9"
  config.model.widths = (32, 64, 128)
  with pytest.raises(ConfigError, match=r"resnet9 takes 4 widths"):
    validate(config)


def test_flip_test_averages_the_logits_of_each_image_and_its_mirror():
  config = model_config("resnet9", widths=(8, 16, 32, 64))
  plain = create_model(config.model, 2)
  config.model.flip_test = True
  mirrored = create_model(config.model, 2)
  variables = _variables(plain)
  images = jax.random.randint(jax.random.key(1), (3, 32, 32, 3), 0, 256).astype(jnp.uint8)
  one = plain.apply(variables, images)
  other = plain.apply(variables, images[:, :, ::-1, :])
  both = mirrored.apply(variables, images)
  # One pass over a double batch against two passes: a convolution library may sum in
  # another order for another batch size, so the two agree to float32 rounding of an
  # 8-convolution network (+ head) whose longest sum is a 3×3 convolution over 64
  # channels, norm-wise (tests/numerics.py), not bit for bit.
  bound = agreement(8 + 1, 3 * 3 * 64)
  assert normwise_error(both, (one + other) / 2) <= bound
  assert not np.allclose(one, other)  # The mirror really is another input.
  # Training ignores it: the mirror would leak into the batch statistics.
  train_out, _ = mirrored.apply(variables, images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(0)})
  assert train_out.shape == (3, 2)


@pytest.mark.parametrize("sizes, epochs, expected", [
    ((), 4, [128, 128, 128, 128]),
    ((64, 96, 128), 13, [64] * 5 + [96] * 4 + [128] * 4),
    ((64, 128), 3, [64, 64, 128]),
])
def test_progressive_sizes_share_the_epochs_equally(sizes, epochs, expected):
  config = base_config()
  config.data.image_size = 128
  config.num_epochs = epochs
  config.train.progressive_sizes = sizes
  assert [train.training_size(config, e) for e in range(epochs)] == expected


def test_progressive_sizes_above_the_image_size_are_refused():
  config = base_config()
  config.data.source = "generated:shapes"
  config.data.image_size = 64
  config.train.progressive_sizes = (32, 96)
  with pytest.raises(ConfigError, match=r"train.progressive_sizes.*from 8 to "
                     r"data.image_size"):
    validate(config)


def test_resize_keeps_the_value_range_and_a_flat_image_flat():
  flat = jnp.full((2, 32, 32, 3), 200, jnp.uint8)
  out = augment.resize(flat, 16)
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
  # Antialiasing weights sum to one: a constant image stays that constant (float32).
  np.testing.assert_allclose(out, 200.0, rtol=2 ** -20)


@pytest.mark.slow
def test_a_progressive_run_trains_at_each_size_and_validates_at_full_size(
    shapes_dir, make_config, tmp_path, caplog):
  config = make_config(f"folder:{shapes_dir}", **{
      "model.name": "resnet9", "model.widths": (8, 16, 16, 16), "num_epochs": 2,
      "data.image_size": 32, "train.progressive_sizes": (16, 32),
      "model.flip_test": True})
  seen = []
  original = train.pmapped_train_step
  caplog.set_level(logging.INFO, logger="jaxcls")

  def recording(config, devices, **kwargs):
    seen.append(kwargs.get("image_size"))
    return original(config, devices, **kwargs)

  train.pmapped_train_step = recording
  try:
    _, summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    train.pmapped_train_step = original
  assert 16 in seen and 32 in seen
  assert "per 32 px image (XLA, multiply-add = 2); trains at 16, 32 px;" in caplog.text
  assert summary.last_epoch.epoch == 2 and summary.last_epoch.val_accuracy > 0.5
