"""Models: torchvision-sized ResNets, a synchronised training step on 8 devices, the
configurable head, bfloat16 training, dtype "auto", label smoothing and the FLOPs
estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls.models import create_model, resolve_dtype
from jaxcls.steps import forward_flops_per_image as flops_per_image
from jaxcls.steps import loss_fn as _loss
from jaxcls.workdir import load_run
from model_utils import check_synchronised_step, make_batch, make_state, model_config, one_step


@pytest.mark.parametrize("name, params", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_resnet_parameter_counts_match_torchvision(name, params):
  model = create_model(model_config(name).model, 1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == params


def test_cnn_trains_a_synchronised_step_on_8_devices():
  check_synchronised_step("cnn")


def test_head_hidden_layers_live_in_the_head_group():
  config = model_config("cnn", head_hidden=(32, 24))
  model = create_model(config.model, 5)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  head = shapes["params"]["head"]
  assert set(shapes["params"]) == {"backbone", "head"}
  assert head["hidden_0"]["kernel"].shape == (16, 32)
  assert head["hidden_1"]["kernel"].shape == (32, 24)
  assert head["kernel"].shape == (24, 5) and head["bias"].shape == (5,)
  plain = jax.eval_shape(create_model(model_config("cnn").model, 5).init,
                         jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert set(plain["params"]["head"]) == {"kernel", "bias"}


def test_bfloat16_step_keeps_float32_state_and_matches_float32_loss():
  f32 = make_state(model_config("cnn"), num_classes=3, image_size=16)
  bf16 = make_state(model_config("cnn", dtype="bfloat16"), num_classes=3, image_size=16)
  batch = make_batch(8, 2, 16, 3)
  new32, m32 = one_step(f32, batch)
  new16, m16 = one_step(bf16, batch)
  for leaf in jax.tree.leaves((new16.params, new16.opt_state, new16.batch_stats)):
    assert leaf.dtype in (np.float32, np.int32)
  assert m16["loss"].dtype == np.float32
  assert abs(float(m16["loss"][0]) - float(m32["loss"][0])) < 0.02 * float(m32["loss"][0])
  # The computation did run in bfloat16: the losses are close but not equal.
  assert float(m16["loss"][0]) != float(m32["loss"][0])


def test_label_smoothing_loss_is_cross_entropy_against_smoothed_targets():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = jnp.array([0, 2])
  log_p = np.asarray(jax.nn.log_softmax(logits))
  targets = np.full((2, 3), 0.3 / 3)
  targets[[0, 1], [0, 2]] += 0.7
  expected = -np.mean(np.sum(targets * log_p, axis=1))
  assert float(_loss(logits, labels, 0.3)) == pytest.approx(expected, rel=1e-6)
  assert float(_loss(logits, labels, 0.0)) == pytest.approx(
      -np.mean(log_p[[0, 1], [0, 2]]), rel=1e-6)


def _valid_taps(size: int) -> int:
  """Multiply-adds of a 3×3 'SAME' convolution over size×size, per channel pair,
  leaving out the taps that fall on zero padding (XLA does not count those)."""
  return (3 * size - 2) ** 2


def test_flops_per_image_is_xla_count_of_multiply_adds():
  model = create_model(model_config("cnn").model, 10)  # widths (8, 16) at 16 px.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  conv_and_dense = 2 * (_valid_taps(16) * (3 * 8 + 8 * 8) + _valid_taps(8) * (8 * 16 + 16 * 16)
                        + 16 * 10)
  flops = flops_per_image(model, shapes, 16)
  # The rest is element-wise work: normalization, batch norm, ReLU, pooling.
  assert conv_and_dense <= flops <= 1.06 * conv_and_dense


@pytest.mark.parametrize("backend, expected", [
    ("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16), ("cpu", jnp.float32)])
def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpus(monkeypatch, backend,
                                                                    expected):
  config = model_config("cnn")
  assert config.model.dtype == "auto"  # The default.
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  model = create_model(config.model, 3)
  assert model.dtype == expected and model.backbone.dtype == expected
  # A dtype named outright is what it says on any backend.
  assert create_model(model_config("cnn", dtype="float32").model, 3).dtype == jnp.float32
  assert resolve_dtype("auto", "cpu") == jnp.float32
  assert resolve_dtype("auto", "cuda") == jnp.bfloat16


def test_auto_is_resolved_where_a_saved_run_is_loaded(monkeypatch, predict_workdir):
  """The workdir records "auto", so a run trained on a GPU computes in float32 when a
  CPU loads it, and in bfloat16 on a GPU (its parameters are float32 either way)."""
  on_cpu = load_run(predict_workdir)
  assert on_cpu.meta.config["model"]["dtype"] == "auto"  # As the checkpoint records it.
  assert on_cpu.model.dtype == jnp.float32
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  run = load_run(predict_workdir)
  assert run.model.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(run.variables)} == {jnp.dtype(jnp.float32)}


def test_a_bfloat16_model_has_float32_parameters_and_computes_its_logits_in_float32():
  model = create_model(model_config("cnn", dtype="bfloat16").model, 3)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)), jnp.uint8)
  variables = model.init(jax.random.key(0), images)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, seen = model.apply(variables, images, capture_intermediates=True)
  features = seen["intermediates"]["backbone"]["__call__"][0]
  assert features.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  head = jax.device_get(variables["params"]["head"])
  expected = np.asarray(features, np.float32) @ head["kernel"] + head["bias"]
  # The output layer in float32: a sum of 16 float32 products, off by a few float32
  # roundings (u = 2^-24) of the largest term. In bfloat16 (8 bits) the logits would
  # be off by about 2^-9 of their size.
  bound = 16 * 2.0 ** -24 * np.max(np.abs(np.asarray(features, np.float32)) @
                                    np.abs(head["kernel"]) + np.abs(head["bias"]))
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=bound)
  assert np.max(np.abs(expected)) > 2.0 ** 9 * bound  # bfloat16 rounding would show.
