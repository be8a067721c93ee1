"""The CPU batch norm, max pool and convolution give flax's and lax's results: values,
gradients, running statistics, across 8 devices, and the same variable tree; the default
XLA option."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls import _xla_defaults
from jax import lax

from jaxcls.models import create_model, layers, onednn
from model_utils import model_config


def _bn_loss(module, variables, x, weights):
  y, updates = module.apply(variables, x, mutable=["batch_stats"])
  return jnp.sum(jnp.sin(y) * weights), updates


def _bn_pair(**kwargs):
  ours = layers.BatchNorm(momentum=0.9, epsilon=1e-5, **kwargs)
  theirs = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, **kwargs)
  return ours, theirs


def _bn_variables(features):
  rng = np.random.default_rng(1)
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=features), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.normal(size=features), jnp.float32),
                          "var": jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32)}}


def test_batch_norm_matches_flax_values_gradients_and_running_statistics():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 3.0, (8, 6, 5, 16)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _bn_variables(16)
  results = []
  for module in _bn_pair():
    grad_fn = jax.value_and_grad(lambda v, x, m=module: _bn_loss(m, v, x, weights),
                                 argnums=(0, 1), has_aux=True)
    results.append(grad_fn(variables, x))
  (loss_a, stats_a), grads_a = results[0]
  (loss_b, stats_b), grads_b = results[1]
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((stats_a, grads_a)), jax.tree.leaves((stats_b, grads_b))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  # The running statistics really moved (the comparison above is not of two no-ops).
  assert not np.allclose(stats_a["batch_stats"]["mean"], variables["batch_stats"]["mean"])
  # Evaluation mode uses the running statistics, as flax's does.
  eval_ours = layers.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
  eval_theirs = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
  np.testing.assert_allclose(eval_ours, eval_theirs, rtol=1e-5, atol=1e-5)


def test_batch_norm_keeps_the_compute_dtype():
  x = jnp.ones((4, 3, 3, 8), jnp.bfloat16)
  variables = _bn_variables(8)
  y, _ = layers.BatchNorm(dtype=jnp.bfloat16).apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16


def test_batch_norm_across_8_devices_matches_flax():
  devices = jax.local_devices()
  assert len(devices) == 8
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(0.5, 2.0, (8, 4, 3, 3, 8)), jnp.float32)  # 4 per device.
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _bn_variables(8)
  outputs = []
  for module in _bn_pair(axis_name="batch"):
    def step(x, w, module=module):
      grad_fn = jax.value_and_grad(lambda v: _bn_loss(module, v, x, w), has_aux=True)
      (loss, stats), grads = grad_fn(variables)
      return loss, stats, grads, jax.grad(lambda x: _bn_loss(module, variables, x, w)[0])(x)
    outputs.append(jax.pmap(step, axis_name="batch")(x, weights))
  for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  # Statistics are shared: every device holds the same running mean.
  mean = outputs[0][1]["batch_stats"]["mean"]
  np.testing.assert_allclose(mean, np.broadcast_to(mean[0], mean.shape), rtol=1e-6)


@pytest.mark.parametrize("window, stride, padding, size", [(3, 2, 1, 9), (3, 2, 1, 8),
                                                           (2, 2, 0, 7), (2, 2, 0, 8)])
def test_max_pool_matches_flax_including_ties(window, stride, padding, size):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, size, size, 4)).astype(np.float32)
  x[:, :, 1::2] = x[:, :, ::2][:, :, :x[:, :, 1::2].shape[2]]  # Equal neighbours: ties.
  x = jnp.asarray(x)

  def theirs(x):
    return nn.max_pool(x, (window, window), strides=(stride, stride),
                       padding=((padding, padding), (padding, padding)))

  def ours(x):
    return layers.max_pool(x, window, stride, padding)

  assert layers.fast_cpu_ops()  # The hand-written version is the one under test here.
  np.testing.assert_array_equal(ours(x), theirs(x))
  cotangent = jnp.asarray(rng.normal(size=theirs(x).shape), jnp.float32)
  grad_ours = jax.vjp(ours, x)[1](cotangent)[0]
  grad_theirs = jax.vjp(theirs, x)[1](cotangent)[0]
  np.testing.assert_allclose(grad_ours, grad_theirs, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(grad_ours).sum()) > 0


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_models_have_the_same_variables_with_either_layer_set(name, monkeypatch):
  model = create_model(model_config(name).model, 2)
  init = lambda: jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  ours = init()
  monkeypatch.setattr(layers, "fast_cpu_ops", lambda: False)
  theirs = init()
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert [a.shape for a in jax.tree.leaves(ours)] == [b.shape for b in jax.tree.leaves(theirs)]


def test_xla_default_is_added_only_when_allowed(monkeypatch):
  monkeypatch.setattr(_xla_defaults, "_backend_started", lambda: False)
  monkeypatch.setattr(_xla_defaults, "_jaxlib_release", lambda: (0, 10))
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert _xla_defaults.apply(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                      "--xla_cpu_experimental_ynn_fusion_type=individual_dot"]
  own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
  assert not _xla_defaults.apply(own) and own["XLA_FLAGS"].endswith("=")
  off = {"JAXCLS_XLA_DEFAULTS": "0"}
  assert not _xla_defaults.apply(off) and "XLA_FLAGS" not in off
  monkeypatch.setattr(_xla_defaults, "_jaxlib_release", lambda: (0, 99))
  assert not _xla_defaults.apply({})  # Not measured on that jaxlib: left alone.


def test_importing_jaxcls_sets_the_option_before_jax_starts():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXCLS_XLA_DEFAULTS")}
  code = ("import jaxcls, os, jax; jax.numpy.ones(1).block_until_ready(); "
          "print(os.environ.get('XLA_FLAGS', ''))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=True).stdout.strip()
  expected = _xla_defaults._jaxlib_release() in _xla_defaults.MEASURED_JAXLIB
  assert ("ynn_fusion_type=individual_dot" in out) == expected


def test_batch_norm_in_bfloat16_is_as_accurate_as_flax():
  rng = np.random.default_rng(4)
  x32 = rng.normal(10.0, 1.0, (16, 8, 8, 8)).astype(np.float32)  # mean/std = 10
  dy32 = rng.normal(size=x32.shape).astype(np.float32) + 5 * (x32 - 10.0)
  variables = _bn_variables(8)

  def forward_backward(module, x, dy):
    fn = lambda x: module.apply(variables, x, mutable=["batch_stats"])[0]
    y, back = jax.vjp(fn, x)
    return np.asarray(y, np.float64), np.asarray(back(dy.astype(y.dtype))[0], np.float64)

  reference = forward_backward(nn.BatchNorm(momentum=0.9, epsilon=1e-5,
                                            use_running_average=False),
                               jnp.asarray(x32), jnp.asarray(dy32))
  x16, dy16 = jnp.asarray(x32, jnp.bfloat16), jnp.asarray(dy32, jnp.bfloat16)
  errors = {}
  for name, module in zip(("ours", "flax"), _bn_pair(dtype=jnp.bfloat16)):
    got = forward_backward(module, x16, dy16)
    errors[name] = [np.abs(g - r).max() / np.abs(r).max() for g, r in zip(got, reference)]
  for ours, theirs in zip(errors["ours"], errors["flax"]):
    assert ours <= 2 * theirs + 1e-3, errors


def test_batch_norm_initializes_in_train_mode_outside_pmap_and_pools_one_image():
  x = jnp.ones((2, 4, 4, 3))
  variables = layers.BatchNorm(axis_name="batch").init(jax.random.key(0), x)
  assert variables["params"]["scale"].shape == (3,)
  image = jnp.arange(16 * 3, dtype=jnp.float32).reshape(4, 4, 3)
  np.testing.assert_array_equal(layers.max_pool(image, 2, 2),
                                nn.max_pool(image, (2, 2), strides=(2, 2)))


_NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture
def xla_conv():
  """Convolutions traced in the test take XLA's path (oneDNN's declines them)."""
  with onednn.disabled():
    yield


def _conditionals(compiled) -> int:
  """How many conditionals a compiled program holds."""
  return compiled.as_text().count(" conditional(")


@pytest.mark.parametrize("strides, padding, dims, groups, dtype", [
    ((1, 1), ((1, 1), (1, 1)), _NHWC, 1, jnp.float32),
    ((2, 2), "SAME", _NHWC, 1, jnp.float32),
    ((2, 2), [(3, 3), (3, 3)], _NHWC, 1, jnp.float32),  # A list, as padding may come.
    ((1, 1), ((1, 1), (1, 1)), _NHWC, 2, jnp.float32),
    ((1, 1), "VALID", ("NCHW", "OIHW", "NCHW"), 1, jnp.float32),
    ((2, 2), ((1, 1), (1, 1)), _NHWC, 1, jnp.bfloat16),
])
def test_conv_gives_lax_values_and_gradients_bit_for_bit(strides, padding, dims, groups,
                                                         dtype, xla_conv):
  rng = np.random.default_rng(5)
  if dims[0] == "NCHW":
    x, w = rng.normal(size=(3, 4, 9, 9)), rng.normal(size=(6, 4, 3, 3))
  else:
    x, w = rng.normal(size=(3, 9, 9, 4)), rng.normal(size=(3, 3, 4 // groups, 6))
  x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)

  def loss(conv):
    def f(x, w):
      # ReLU in front, as in a network: the activation the weight gradient reads.
      y = conv(jax.nn.relu(x), w, strides, padding, dimension_numbers=dims,
               feature_group_count=groups)
      return jnp.sum(jnp.sin(y.astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  ours = loss(layers.conv_general_dilated)(x, w)
  theirs = loss(lax.conv_general_dilated)(x, w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(ours[1][1]).sum()) > 0  # A real weight gradient was compared.


def test_conv_weight_gradient_transposes_the_stored_activation(xla_conv):
  """The activation goes through a conditional, out of reach of XLA's fusion."""
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 5))

  def compiled(conv):
    def f(x, w):
      y = conv(jax.nn.relu(x * 2.0 + 1.0), w, (1, 1), "SAME", dimension_numbers=_NHWC)
      return jnp.sum(y)
    return jax.jit(jax.grad(f, argnums=1)).lower(x, w).compile()

  assert _conditionals(compiled(layers.conv_general_dilated)) == 1
  assert _conditionals(compiled(lax.conv_general_dilated)) == 0


def test_models_use_the_cpu_convolution_only_on_the_cpu_layer_set(monkeypatch):
  config = model_config("cnn").model
  model = create_model(config, 2)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables)
  x = jnp.ones((2, 16, 16, 3))

  def compiled():
    def loss(params, x):
      logits, _ = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
      return jnp.sum(logits)
    return jax.jit(jax.grad(loss)).lower(variables["params"], x).compile()

  convolutions = 2 * len(config.widths)  # Two per block.
  with onednn.disabled():
    assert _conditionals(compiled()) == convolutions
  if onednn.available():
    calls = _onednn_calls(compiled())
    # The first convolution's input is the image: its input gradient is dropped.
    assert calls == {"forward": convolutions, "backward_data": convolutions - 1,
                     "backward_weights": convolutions}
  monkeypatch.setattr(layers, "fast_cpu_ops", lambda: False)
  assert _conditionals(compiled()) == 0
  assert sum(_onednn_calls(compiled()).values()) == 0


def _onednn_calls(compiled) -> dict[str, int]:
  """How many calls to each of jaxcls's oneDNN handlers a compiled program makes."""
  text = compiled.as_text()
  return {target: text.count(f'custom_call_target="jaxcls_onednn_conv_{target}"')
          for target in onednn.TARGETS}


def test_batch_norm_statistics_stay_accurate_over_a_million_rows():
  # A catdog-sized first layer (64 images of 128×128), with a mean well away from 0, where
  # E[x²] − E[x]² magnifies any error in the sums.
  rng = np.random.default_rng(6)
  x = rng.normal(3.0, 1.0, (64, 128, 128, 4)).astype(np.float32)
  mean, var = jax.jit(lambda x: layers._statistics(x, None))(jnp.asarray(x))
  rows = x.reshape(-1, 4).astype(np.float64)
  np.testing.assert_allclose(mean, rows.mean(0), rtol=2e-6)
  np.testing.assert_allclose(var, rows.var(0), rtol=1e-4)


def test_conv_under_vmap_keeps_its_conditional_and_lax_results(xla_conv):
  # Per-example gradients with shared weights: the predicate reads the weights, so it is
  # not batched and the conditional is not turned into a select of two branches.
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(3, 2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)

  def per_example(conv):
    def f(w, x):
      y = conv(jax.nn.relu(x), w, (1, 1), "SAME", dimension_numbers=_NHWC)
      return jnp.sum(jnp.sin(y))
    return jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0)))

  ours = per_example(layers.conv_general_dilated)
  np.testing.assert_array_equal(ours(w, x), per_example(lax.conv_general_dilated)(w, x))
  assert _conditionals(ours.lower(w, x).compile()) == 1


def test_conv_gradient_of_an_empty_batch_is_zero():
  w = jnp.ones((3, 3, 4, 5))

  def grads(conv):
    f = lambda x, w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=_NHWC))
    return jax.grad(f, argnums=(0, 1))(jnp.zeros((0, 8, 8, 4)), w)

  ours, theirs = grads(layers.conv_general_dilated), grads(lax.conv_general_dilated)
  assert ours[0].shape == (0, 8, 8, 4)
  np.testing.assert_array_equal(ours[1], theirs[1])


def test_batch_norm_traces_with_a_symbolic_batch_size():
  module = layers.BatchNorm()
  variables = module.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)))
  batch, = jax.export.symbolic_shape("b")
  exported = jax.export.export(jax.jit(
      lambda x: module.apply(variables, x, mutable=["batch_stats"])[0]))(
          jax.ShapeDtypeStruct((batch, 4, 4, 3), jnp.float32))
  x = jnp.asarray(np.random.default_rng(8).normal(size=(5, 4, 4, 3)), jnp.float32)
  np.testing.assert_allclose(exported.call(x), module.apply(
      variables, x, mutable=["batch_stats"])[0], rtol=1e-5, atol=1e-6)
