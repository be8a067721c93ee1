"""jaxcls.cpu.conv: lax's convolution, faster. oneDNN's path gives lax's values and
gradients of every order to float32 rounding; XLA's path (everything oneDNN declines)
gives them bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcls import cpu
from jaxcls.cpu import conv, onednn
from numerics import agreement, assert_normwise_close

_NHWC = ("NHWC", "HWIO", "NHWC")
needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason=f"oneDNN unavailable: {onednn.unavailable_reason()}")


def _calls(fn, *args) -> int:
  """How many calls to jaxcls's oneDNN handlers `jax.jit(fn)` compiles to."""
  return jax.jit(fn).lower(*args).compile().as_text().count(cpu.ONEDNN_TARGET_PREFIX)


def _conditionals(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().as_text().count(" conditional(")


def _inputs(seed, x_shape, w_shape, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=x_shape), dtype),
          jnp.asarray(rng.normal(size=w_shape) / np.sqrt(np.prod(w_shape[:3])), dtype))


@pytest.fixture
def xla_conv():
  """Convolutions traced in the test take XLA's path (oneDNN's declines them)."""
  with cpu.disabled():
    yield


# ------------------------------------------------------------------------------ oneDNN


@needs_onednn
@pytest.mark.parametrize("size, kernel, strides, padding", [
    (9, 3, (1, 1), ((1, 1), (1, 1))),
    (9, 3, (2, 2), "SAME"),               # Odd size, stride 2: padding (1, 1).
    (8, 3, (2, 2), "SAME"),               # Even size: padding (0, 1).
    (8, 1, (2, 2), "VALID"),              # ResNet's 1×1 downsample.
    (16, 7, (2, 2), [(3, 3), (3, 3)]),    # The stem, padding as a list.
    (9, 4, (3, 2), ((2, 0), (1, 2))),     # Uneven strides and padding.
])
def test_onednn_gives_lax_values_and_gradients(size, kernel, strides, padding):
  x, w = _inputs(1, (3, size, size, 5), (kernel, kernel, 5, 6))

  def loss(convolution):
    def f(x, w):
      y = convolution(jax.nn.relu(x), w, strides, padding, dimension_numbers=_NHWC)
      return jnp.sum(jnp.sin(y))
    return jax.value_and_grad(f, argnums=(0, 1))

  ours = jax.jit(loss(conv.conv_general_dilated))(x, w)
  theirs = jax.jit(loss(lax.conv_general_dilated))(x, w)
  # Forward, then the loss's sum over outputs and the weight gradient's sum over batch
  # and positions: at most 3 * size * size * 6 terms in one sum.
  assert_normwise_close(ours, theirs, agreement(3, 3 * size * size * 6), "conv")
  assert float(jnp.abs(ours[1][1]).max()) > 0
  assert _calls(loss(conv.conv_general_dilated), x, w) == 3  # Forward, dx and dw.


@needs_onednn
def test_second_and_third_order_gradients_match_lax():
  x, w = _inputs(2, (2, 7, 7, 3), (3, 3, 3, 4))

  def orders(convolution):
    f = lambda x, w: jnp.sum(jnp.tanh(convolution(x, w, (2, 2), "SAME",
                                                  dimension_numbers=_NHWC)))
    # The input gradient's size, differentiated again (a gradient penalty), and once more.
    g = lambda x, w: jnp.sum(jax.grad(f)(x, w) ** 2)
    h = lambda x, w: jnp.sum(jax.grad(g, argnums=1)(x, w) ** 2)
    return jax.jit(jax.grad(g, argnums=(0, 1))), jax.jit(jax.grad(h, argnums=(0, 1)))

  for depth, ours, theirs in zip((4, 6), orders(conv.conv_general_dilated),
                                 orders(lax.conv_general_dilated)):
    # Each order of differentiation adds a forward and a backward pass.
    assert_normwise_close(ours(x, w), theirs(x, w), agreement(depth, 2 * 7 * 7 * 4),
                          f"order {depth // 2}")
  third = jax.jit(orders(conv.conv_general_dilated)[1]).lower(x, w).compile().as_text()
  assert third.count(cpu.ONEDNN_TARGET_PREFIX) > 3 and " convolution(" not in third
  assert _calls(orders(lax.conv_general_dilated)[1], x, w) == 0


@needs_onednn
def test_per_example_gradients_under_vmap_match_lax():
  x, w = _inputs(4, (3, 2, 8, 8, 4), (3, 3, 4, 5))

  def per_example(convolution):
    def f(w, x):
      return jnp.sum(jnp.sin(convolution(jax.nn.relu(x), w, (1, 1), "SAME",
                                         dimension_numbers=_NHWC)))
    return jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0)))

  ours = per_example(conv.conv_general_dilated)
  theirs = per_example(lax.conv_general_dilated)
  for a, b in zip(ours(w, x), theirs(w, x)):  # Each example's gradient on its own.
    assert_normwise_close(a, b, agreement(2, 2 * 8 * 8 * 5), "per-example gradient")
  assert "jaxcls_onednn_conv_backward_weights" in ours.lower(w, x).compile().as_text()


@needs_onednn
@pytest.mark.parametrize("case", ["bfloat16", "groups", "dilation", "nchw", "empty",
                                  "window_past_input", "disabled"])
def test_declined_cases_run_xla_convolution_with_lax_results(case):
  """What oneDNN's path does not take goes to XLA's, with lax's results bit for bit."""
  dims, groups, dilation, dtype, x_shape = _NHWC, 1, (1, 1), jnp.float32, (2, 8, 8, 4)
  padding, strides = "SAME", (1, 1)
  w_shape = (3, 3, 4, 6)
  if case == "bfloat16":
    dtype = jnp.bfloat16
  elif case == "groups":
    groups, w_shape = 2, (3, 3, 2, 6)
  elif case == "dilation":
    dilation = (2, 2)
  elif case == "nchw":
    dims, x_shape, w_shape = ("NCHW", "OIHW", "NCHW"), (2, 4, 8, 8), (6, 4, 3, 3)
  elif case == "empty":
    x_shape = (0, 8, 8, 4)
  elif case == "window_past_input":  # Stride 2, a 3×3 window over 2×2: no output.
    x_shape, padding, strides = (2, 2, 2, 4), "VALID", (2, 2)
  x, w = _inputs(3, x_shape, w_shape, dtype)

  def loss(convolution):
    f = lambda x, w: jnp.sum(jnp.sin(convolution(x, w, strides, padding,
                                                 rhs_dilation=dilation,
                                                 dimension_numbers=dims,
                                                 feature_group_count=groups)))
    return jax.grad(f, argnums=(0, 1))

  if case == "disabled":
    with cpu.disabled():
      assert _calls(loss(conv.conv_general_dilated), x, w) == 0
    assert _calls(loss(conv.conv_general_dilated), x, w) == 3
    return
  assert _calls(loss(conv.conv_general_dilated), x, w) == 0
  for a, b in zip(jax.jit(loss(conv.conv_general_dilated))(x, w),
                  jax.jit(loss(lax.conv_general_dilated))(x, w)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------ XLA's path


@pytest.mark.parametrize("strides, padding, dims, groups, dtype", [
    ((1, 1), ((1, 1), (1, 1)), _NHWC, 1, jnp.float32),
    ((2, 2), "SAME", _NHWC, 1, jnp.float32),
    ((2, 2), [(3, 3), (3, 3)], _NHWC, 1, jnp.float32),  # A list, as padding may come.
    ((1, 1), ((1, 1), (1, 1)), _NHWC, 2, jnp.float32),
    ((1, 1), "VALID", ("NCHW", "OIHW", "NCHW"), 1, jnp.float32),
    ((2, 2), ((1, 1), (1, 1)), _NHWC, 1, jnp.bfloat16),
])
def test_xla_path_gives_lax_values_and_gradients_bit_for_bit(strides, padding, dims,
                                                             groups, dtype, xla_conv):
  rng = np.random.default_rng(5)
  if dims[0] == "NCHW":
    x, w = rng.normal(size=(3, 4, 9, 9)), rng.normal(size=(6, 4, 3, 3))
  else:
    x, w = rng.normal(size=(3, 9, 9, 4)), rng.normal(size=(3, 3, 4 // groups, 6))
  x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)

  def loss(convolution):
    def f(x, w):
      # ReLU in front, as in a network: the activation the weight gradient reads.
      y = convolution(jax.nn.relu(x), w, strides, padding, dimension_numbers=dims,
                      feature_group_count=groups)
      return jnp.sum(jnp.sin(y.astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  ours = loss(conv.conv_general_dilated)(x, w)
  theirs = loss(lax.conv_general_dilated)(x, w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(ours[1][1]).sum()) > 0  # A real weight gradient was compared.


def test_weight_gradient_transposes_the_stored_activation(xla_conv):
  """The activation goes through a conditional, out of reach of XLA's fusion."""
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 5))

  def weight_gradient(convolution):
    def f(x, w):
      y = convolution(jax.nn.relu(x * 2.0 + 1.0), w, (1, 1), "SAME",
                      dimension_numbers=_NHWC)
      return jnp.sum(y)
    return jax.grad(f, argnums=1)

  assert _conditionals(weight_gradient(conv.conv_general_dilated), x, w) == 1
  assert _conditionals(weight_gradient(lax.conv_general_dilated), x, w) == 0


def test_xla_path_under_vmap_keeps_its_conditional_and_lax_results(xla_conv):
  # Per-example gradients with shared weights: the predicate reads the weights, so it is
  # not batched and the conditional is not turned into a select of two branches.
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(3, 2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)

  def per_example(convolution):
    def f(w, x):
      y = convolution(jax.nn.relu(x), w, (1, 1), "SAME", dimension_numbers=_NHWC)
      return jnp.sum(jnp.sin(y))
    return jax.vmap(jax.grad(f), in_axes=(None, 0))

  np.testing.assert_array_equal(jax.jit(per_example(conv.conv_general_dilated))(w, x),
                                jax.jit(per_example(lax.conv_general_dilated))(w, x))
  assert _conditionals(per_example(conv.conv_general_dilated), w, x) == 1


def test_gradient_of_an_empty_batch_is_zero():
  w = jnp.ones((3, 3, 4, 5))

  def grads(convolution):
    f = lambda x, w: jnp.sum(convolution(x, w, (1, 1), "SAME", dimension_numbers=_NHWC))
    return jax.grad(f, argnums=(0, 1))(jnp.zeros((0, 8, 8, 4)), w)

  ours, theirs = grads(conv.conv_general_dilated), grads(lax.conv_general_dilated)
  assert ours[0].shape == (0, 8, 8, 4)
  np.testing.assert_array_equal(ours[1], theirs[1])
