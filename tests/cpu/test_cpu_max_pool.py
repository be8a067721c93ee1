"""jaxcls.cpu's lowering of max pooling's gradient: XLA's gradient, ties included, without
`select_and_scatter` in the compiled program."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls import cpu
from jaxcls.cpu import max_pool


def _pool_gradient(window, stride, padding):
  def f(x, dy):
    pooled, back = jax.vjp(lambda x: nn.max_pool(
        x, (window, window), strides=(stride, stride),
        padding=((padding, padding), (padding, padding))), x)
    return back(dy)[0]
  return f


@pytest.mark.parametrize("window, stride, padding, size", [(3, 2, 1, 9), (3, 2, 1, 8),
                                                           (2, 2, 0, 7), (2, 2, 0, 8)])
def test_gradient_is_xla_s_including_ties(window, stride, padding, size):
  assert max_pool.install()
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, size, size, 4)).astype(np.float32)
  x[:, :, 1::2] = x[:, :, ::2][:, :, :x[:, :, 1::2].shape[2]]  # Equal neighbours: ties.
  out = (size + 2 * padding - window) // stride + 1
  dy = rng.normal(size=(2, out, out, 4)).astype(np.float32)
  ours = jax.jit(_pool_gradient(window, stride, padding))
  with cpu.disabled():  # Lowered inside: JAX's own select_and_scatter.
    lowered = jax.jit(_pool_gradient(window, stride, padding)).lower(x, dy)
    theirs = lowered.compile()
  assert "select_and_scatter" in lowered.as_text()
  assert "select_and_scatter" not in ours.lower(x, dy).as_text()
  # Each input element gets the gradients of the windows whose first maximum it is;
  # overlapping windows add up to 4 of them, in an order that may round differently:
  # two such sums differ by at most 2 · 3u · (4 · max |dy|).
  np.testing.assert_allclose(ours(x, dy), theirs(x, dy), rtol=0,
                             atol=24 * 2.0 ** -24 * np.abs(dy).max())
  assert float(jnp.abs(ours(x, dy)).sum()) > 0


def test_scatter_gradient_handles_other_ranks_and_one_unbatched_image():
  rng = np.random.default_rng(4)
  image = jnp.asarray(rng.normal(size=(6, 6, 3)), jnp.float32)
  for x, window, strides, padding in [
      (image, (2, 2, 1), (2, 2, 1), ((0, 0), (0, 0), (0, 0))),
      (image[None], (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))]:
    y = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    with cpu.disabled():
      expected = jax.vjp(lambda a: jax.lax.reduce_window(
          a, -jnp.inf, jax.lax.max, window, strides, padding), x)[1](dy)[0]
    got = max_pool.scatter_gradient(dy, x, window, strides, padding)
    np.testing.assert_allclose(got, expected, rtol=0,
                               atol=24 * 2.0 ** -24 * float(jnp.abs(dy).max()))


def test_a_window_larger_than_the_image_has_xla_s_empty_output_and_zero_gradient():
  """A network pooled more times than its input allows (ResNet-9 s4 at 24 px): an empty
  output and a zero gradient, as XLA gives, not an error while lowering."""
  assert max_pool.install()
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 1, 1, 4)), jnp.float32)
  dy = jnp.zeros((2, 0, 0, 4), jnp.float32)
  ours = jax.jit(_pool_gradient(2, 2, 0))(x, dy)
  with cpu.disabled():
    theirs = jax.jit(_pool_gradient(2, 2, 0))(x, dy)
  assert ours.shape == theirs.shape == x.shape
  np.testing.assert_array_equal(ours, np.zeros(x.shape, np.float32))
  np.testing.assert_array_equal(theirs, np.zeros(x.shape, np.float32))


@pytest.mark.parametrize("window, stride, padding, size", [(2, 2, 0, 8), (3, 2, 1, 9),
                                                           (3, 1, 1, 6)])
def test_nan_and_infinities_route_the_gradient_as_xla_does(window, stride, padding, size):
  assert max_pool.install()
  rng = np.random.default_rng(5)
  values = np.array([np.nan, -np.inf, np.inf, 0.0, 1.0, -1.0], np.float32)
  x = rng.choice(values, size=(2, size, size, 3))  # Most windows hold a NaN or a tie.
  out = (size + 2 * padding - window) // stride + 1
  dy = rng.normal(size=(2, out, out, 3)).astype(np.float32)
  ours = jax.jit(_pool_gradient(window, stride, padding))(x, dy)
  with cpu.disabled():
    theirs = jax.jit(_pool_gradient(window, stride, padding))(x, dy)
  # As in the test above: up to 4 contributions per element, added in another order.
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=24 * 2.0 ** -24 * np.abs(dy).max())


def test_a_window_with_a_nan_passes_its_gradient_where_xla_s_scan_ends():
  # XLA's select_and_scatter keeps its pick while `pick >= next` holds: a NaN is picked
  # and then given up to the element after it, so in [1, NaN, 2, 0] the 2 gets it.
  assert max_pool.install()
  for row, expected in [([1.0, np.nan, 2.0, 0.0], [0, 0, 5, 0]),
                        ([1.0, 2.0, 0.0, np.nan], [0, 0, 0, 5]),
                        ([3.0, 1.0, 3.0, 2.0], [5, 0, 0, 0])]:  # No NaN: the first max.
    x = jnp.asarray(row, jnp.float32)[None, :, None]
    pool = lambda x: nn.max_pool(x, (4,), strides=(4,))
    gradient = jax.jit(lambda x: jax.vjp(pool, x)[1](jnp.full((1, 1, 1), 5.0))[0])
    np.testing.assert_array_equal(gradient(x).ravel(), expected)
