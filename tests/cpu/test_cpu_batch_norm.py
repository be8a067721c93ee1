"""jaxcls.cpu's batch norm, applied to flax's `nn.BatchNorm` from outside: flax's
variables, values, gradients and running statistics, on one device and across 8."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import cpu
from jaxcls.cpu import batch_norm
from numerics import U, agreement, assert_normwise_close


def _variables(features):
  rng = np.random.default_rng(1)
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=features), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.normal(size=features), jnp.float32),
                          "var": jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32)}}


def _module(**kwargs):
  return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, **kwargs)


def _loss_and_grads(apply, variables, x, weights):
  def loss(v, x):
    y, updates = apply(v, x, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * weights), updates
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)


def _intercepted(apply, *args) -> bool:
  """Whether tracing `apply` ran jaxcls.cpu's batch norm (its custom derivative)."""
  return "_normalize_train" in str(jax.make_jaxpr(apply)(*args))


def test_values_gradients_and_running_statistics_are_flax_s():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 3.0, (8, 6, 5, 16)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _variables(16)
  module = _module()
  ours = jax.jit(lambda v, x: _loss_and_grads(cpu.accelerate(module.apply), v, x,
                                              weights))(variables, x)
  theirs = jax.jit(lambda v, x: _loss_and_grads(module.apply, v, x, weights))(variables, x)
  assert _intercepted(lambda v, x: cpu.accelerate(module.apply)(
      v, x, mutable=["batch_stats"]), variables, x)
  # Statistics, normalization and the two backward sums: 4 layers of 240-term sums.
  assert_normwise_close(ours, theirs, agreement(4, 8 * 6 * 5), "batch norm")
  # The running statistics really moved (the comparison above is not of two no-ops).
  (_, stats), _ = ours
  assert not np.allclose(stats["batch_stats"]["mean"], variables["batch_stats"]["mean"])


def test_evaluation_mode_and_initialization_are_flax_s_own_layer():
  x = jnp.ones((2, 4, 4, 3))
  module = nn.BatchNorm(use_running_average=True)
  variables = cpu.accelerate(module.init)(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(module.init(jax.random.key(0), x))
  assert not _intercepted(lambda v, x: cpu.accelerate(module.apply)(v, x), variables, x)
  # Initializing in training mode with an axis name outside pmap works, as with flax.
  train_module = nn.BatchNorm(use_running_average=False, axis_name="batch")
  assert cpu.accelerate(train_module.init)(jax.random.key(0), x)["params"]["scale"].shape == (3,)


def test_calls_it_does_not_reproduce_are_left_to_flax():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3, 3, 6)), jnp.float32)
  for module, kwargs in [(_module(axis=1), {}), (_module(use_fast_variance=False), {}),
                         (_module(), {"mask": jnp.ones(x.shape, bool)})]:
    variables = module.init(jax.random.key(0), x, **kwargs)

    def apply(v, x, module=module, kwargs=kwargs):
      return cpu.accelerate(module.apply)(v, x, mutable=["batch_stats"], **kwargs)

    assert not _intercepted(apply, variables, x), module
    np.testing.assert_array_equal(apply(variables, x)[0], module.apply(
        variables, x, mutable=["batch_stats"], **kwargs)[0])


def test_keeps_the_compute_dtype():
  x = jnp.ones((4, 3, 3, 8), jnp.bfloat16)
  module = _module(dtype=jnp.bfloat16)
  y, _ = cpu.accelerate(module.apply)(_variables(8), x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16


def test_across_8_devices_matches_flax():
  assert jax.local_device_count() == 8
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(0.5, 2.0, (8, 4, 3, 3, 8)), jnp.float32)  # 4 per device.
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = _variables(8)
  module = _module(axis_name="batch")
  outputs = [jax.pmap(lambda x, w, apply=apply: _loss_and_grads(apply, variables, x, w),
                      axis_name="batch")(x, weights)
             for apply in (cpu.accelerate(module.apply), module.apply)]
  # Statistics over 8 devices × 36 rows: 4 layers of 288-term sums.
  assert_normwise_close(outputs[0], outputs[1], agreement(4, 8 * 36), "8 devices")
  # Statistics are shared: every device holds the same running mean.
  mean = outputs[0][0][1]["batch_stats"]["mean"]
  np.testing.assert_array_equal(mean, np.broadcast_to(mean[0], mean.shape))


def test_in_bfloat16_it_is_as_accurate_as_flax():
  rng = np.random.default_rng(4)
  x32 = rng.normal(10.0, 1.0, (16, 8, 8, 8)).astype(np.float32)  # mean/std = 10
  dy32 = rng.normal(size=x32.shape).astype(np.float32) + 5 * (x32 - 10.0)
  variables = _variables(8)

  def forward_backward(apply, x, dy):
    fn = lambda x: apply(variables, x, mutable=["batch_stats"])[0]
    y, back = jax.vjp(fn, x)
    return np.asarray(y, np.float64), np.asarray(back(dy.astype(y.dtype))[0], np.float64)

  reference = forward_backward(_module().apply, jnp.asarray(x32), jnp.asarray(dy32))
  x16, dy16 = jnp.asarray(x32, jnp.bfloat16), jnp.asarray(dy32, jnp.bfloat16)
  module = _module(dtype=jnp.bfloat16)
  errors = {}
  for name, apply in (("ours", cpu.accelerate(module.apply)), ("flax", module.apply)):
    got = forward_backward(apply, x16, dy16)
    errors[name] = [np.abs(g - r).max() / np.abs(r).max() for g, r in zip(got, reference)]
  # bfloat16 rounding (2^-8) dominates both; ours may not be worse than twice flax's.
  for ours, theirs in zip(errors["ours"], errors["flax"]):
    assert ours <= 2 * theirs + 2 ** -8, errors


def test_sums_over_a_million_rows_are_folded_and_accurate():
  """The sums fold the 1,048,576 rows into 64 groups: each sum the dot library adds has
  16,384 terms, then 64 partial sums are added. That bounds the error whatever order the
  library adds in: 3·(√16384 + √64)·u of Σ|x| (numerics.py's model)."""
  rng = np.random.default_rng(6)
  x = rng.normal(3.0, 1.0, (64, 128, 128, 4)).astype(np.float32)
  jaxpr = str(jax.make_jaxpr(batch_norm.channel_sums)(jnp.asarray(x)))
  assert "f32[16384,256]" in jaxpr  # [M / 64, 64 · C], the folded operand.
  rows = x.reshape(-1, 4).astype(np.float64)
  bound = 3 * (np.sqrt(16384) + np.sqrt(64)) * U
  for values in (rows, rows * rows):
    sums = np.asarray(jax.jit(batch_norm.channel_sums)(jnp.asarray(values, np.float32)))
    error = np.abs(sums - values.sum(0)) / np.abs(values).sum(0)
    assert np.all(error <= bound), (error, bound)


def test_traces_with_a_symbolic_batch_size():
  module = _module()
  variables = module.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)))
  apply = lambda x: cpu.accelerate(module.apply)(variables, x, mutable=["batch_stats"])[0]
  batch, = jax.export.symbolic_shape("b")
  exported = jax.export.export(jax.jit(apply))(
      jax.ShapeDtypeStruct((batch, 4, 4, 3), jnp.float32))
  x = jnp.asarray(np.random.default_rng(8).normal(size=(5, 4, 4, 3)), jnp.float32)
  assert_normwise_close(exported.call(x), module.apply(variables, x,
                                                       mutable=["batch_stats"])[0],
                        agreement(2, 5 * 16), "symbolic batch")
