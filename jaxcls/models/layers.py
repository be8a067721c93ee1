"""Batch norm, max pooling and convolution written for XLA:CPU's strengths, same results.

XLA:CPU spends much of a ResNet train step outside the convolutions:

- Per-channel sums over [N, H, W] (batch-norm statistics in the forward pass, and the
  scale/bias gradients and statistics cotangents in the backward pass) are fused with
  their elementwise neighbours into loops that walk the activations with a stride of
  one row per channel. The same sums written as a matrix-vector product (`ones @ z`)
  run in the dot library instead. On ResNet-18 (128 px, batch 32) forward + backward
  takes 0.72 of its time with `flax.linen.BatchNorm`.
- `reduce_window`'s gradient, `select_and_scatter`, is a slow scalar loop. The max-pool
  here keeps the argmax rule (the first maximum in window order gets the gradient) but
  computes the backward pass from masked copies of the incoming gradient: nine strided
  pads for the ResNet stem's overlapping 3×3/2 pool (26–60 against 89–163 ms at batch
  32), one interleaving copy for the CNN's 2×2/2 pool (61 against 436 ms at batch 64,
  128 px).

- A convolution's weight gradient needs its input activation transposed (batch and
  channel axes swapped). XLA fuses that transpose with the ops that made the activation
  (batch norm, ReLU, the residual add) and recomputes them in transposed order, which
  is slow; the convolution here transposes the stored activation instead, with the
  same results bit for bit. The train step takes 0.90 of its time for ResNet-18, 0.80
  for the catdog CNN and 0.77 for ResNet-50 (128 px, in one process).
- Faster still: where `jaxcls.models.onednn` is available (Linux x86-64, the
  `onednn-cpu-gomp` dependency, a C++ compiler for a one-time build), float32 NHWC
  convolutions run oneDNN's kernels, forward and both gradients, and the train step
  takes 0.85 of the time above for ResNet-18, 0.76 for the CNN and 0.87 for ResNet-50.
  Everything oneDNN's path declines (other dtypes, groups, dilation, other layouts,
  symbolic shapes, exports) takes the Eigen path with the conditional.

All three are used where JAX's default backend is the CPU (`fast_cpu_ops()`); on GPUs
and TPUs the models keep flax's layers, which their compilers already handle well. The
variables are flax's (the batch norm's params `scale`, `bias` and batch_stats `mean`,
`var`, with the same update rule; the convolution is `flax.linen.Conv` itself), so
checkpoints move freely between the two.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxcls.models import onednn


def fast_cpu_ops() -> bool:
  """True when traced for the CPU backend, where this module's layers pay off.

  `JAXCLS_CPU_LAYERS=0` in the environment turns them off (flax's layers everywhere),
  e.g. to measure what they bring.
  """
  return os.environ.get("JAXCLS_CPU_LAYERS", "1") != "0" and jax.default_backend() == "cpu"


# ----------------------------------------------------------------------------- batch norm

def _channel_sums(z: jax.Array) -> jax.Array:
  """Σ over every axis but the last, as a matrix-vector product (float32).

  The M rows are first folded side by side into k groups ([M, C] → [M/k, k·C], k the
  largest power of two up to 64 that divides M), so the product accumulates k shorter
  sums, which are then added. In one long float32 sum the dot library drifted: over
  1,048,576 rows of mean 3 and std 1, Σx was 1.7e-5 and Σx² 4.5e-5 off (relative),
  the variance E[x²] − E[x]² 6.6e-4; folded, 5.4e-7, 8.2e-7 and 1.1e-5 (flax's
  variance: 2.2e-5). The wider product is faster too. M has such factors whenever the
  batch or the image sides are even; otherwise (or when M is symbolic) k = 1.
  """
  channels = z.shape[-1]
  rows = z.reshape(-1, channels).astype(jnp.float32)
  count = rows.shape[0]
  groups = math.gcd(count, 64) if isinstance(count, int) else 1
  folded = rows.reshape(count // groups, groups * channels)
  partial = jnp.ones((folded.shape[0],), jnp.float32) @ folded
  return partial.reshape(groups, channels).sum(axis=0)


def _statistics(x, axis_name):
  count = x.size // x.shape[-1]
  xf = x.astype(jnp.float32)
  moments = jnp.stack([_channel_sums(xf), _channel_sums(xf * xf)]) / count
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name)
  mean = moments[0]
  # E[x²] − E[x]², as flax computes it by default (use_fast_variance=True).
  var = jnp.maximum(moments[1] - mean * mean, 0.0)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize_train(x, scale, bias, epsilon, axis_name):
  return _normalize_train_fwd(x, scale, bias, epsilon, axis_name)[0]


def _normalize_train_fwd(x, scale, bias, epsilon, axis_name):
  mean, var = _statistics(x, axis_name)
  inv = lax.rsqrt(var + epsilon)
  # Centre and scale in float32, one rounding to x's dtype at the end (as flax does):
  # in bfloat16, x·mul and mean·mul would be rounded apart and then cancel.
  y = ((x.astype(jnp.float32) - mean) * (scale * inv) + bias).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _normalize_train_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, mean, inv, scale = residuals
  dy = cotangents[0]  # The statistics feed only the running averages: no cotangent.
  count = x.size // x.shape[-1]
  dyf = dy.astype(jnp.float32)
  sum_dy = _channel_sums(dyf)
  sum_dy_x = _channel_sums(dyf * x.astype(jnp.float32))
  dbias = sum_dy
  dscale = (sum_dy_x - mean * sum_dy) * inv  # Σ dy · x̂
  totals = jnp.stack([dbias, dscale])
  if axis_name is not None:
    # The statistics came from every device, so every device's cotangents flow back.
    totals = lax.psum(totals, axis_name)
    count = count * lax.psum(1, axis_name)
  mul = scale * inv
  # dx = mul · (dy − mean(dy) − x̂ · mean(dy · x̂)), in float32, rounded once.
  coef_x = -mul * inv * totals[1] / count
  dx = mul * (dyf - totals[0] / count) + coef_x * (x.astype(jnp.float32) - mean)
  return dx.astype(dy.dtype), dscale, dbias


_normalize_train.defvjp(_normalize_train_fwd, _normalize_train_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis, with a hand-written gradient for XLA:CPU.

  Same variables, same statistics (biased batch variance, E[x²] − E[x]²), same running
  average rule (`momentum` × old + (1 − momentum) × batch) and the same cross-device
  mean over `axis_name` (under pmap or vmap). Parameters are float32; `dtype` is the
  output's; normalization is computed in float32 and rounded once.

  Differences from flax's, none of which jaxcls relies on: reverse-mode only (a
  custom VJP: no `jax.jvp`/`jacfwd`); no gradient through the running statistics;
  under `shard_map` with its type checks on, replicated parameters need flax's layer.
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    if self.use_running_average:
      mul = scale * lax.rsqrt(ra_var.value + self.epsilon)
      return ((x.astype(jnp.float32) - ra_mean.value) * mul + bias).astype(dtype)
    # flax, too, skips the cross-device mean while initializing (no axis is bound then).
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = _normalize_train(x, scale, bias, self.epsilon, axis_name)
    if not self.is_initializing():
      # No gradient flows through the running averages (flax's would): nothing in
      # jaxcls differentiates them.
      mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y


def batch_norm(**kwargs) -> nn.Module:
  """This module's BatchNorm on the CPU backend, flax's elsewhere (same variables)."""
  return BatchNorm(**kwargs) if fast_cpu_ops() else nn.BatchNorm(**kwargs)


# ------------------------------------------------------------------------------- max pool

def _window_taps(x, window: int, stride: int, padding: tuple[int, int]):
  """(i, j, strided view) for each window offset, over x padded with −inf."""
  n, h, w, c = x.shape
  lo, hi = padding
  out_h = (h + lo + hi - window) // stride + 1
  out_w = (w + lo + hi - window) // stride + 1
  padded = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)), constant_values=-jnp.inf)
  for i in range(window):
    for j in range(window):
      end = (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c)
      yield i, j, lax.slice(padded, (0, i, j, 0), end, (1, stride, stride, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, padding):
  return _max_pool_fwd(x, window, stride, padding)[0]


def _max_pool_fwd(x, window, stride, padding):
  y = None
  for _, _, tap in _window_taps(x, window, stride, padding):
    y = tap if y is None else jnp.maximum(y, tap)
  return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, dy):
  x, y = residuals
  _, h, w, _ = x.shape
  lo, hi = padding
  out_h, out_w = y.shape[1:3]
  unclaimed = jnp.ones(y.shape, bool)
  zero = jnp.zeros((), dy.dtype)
  parts = []
  for i, j, tap in _window_taps(x, window, stride, padding):
    # The first maximum in window order takes the gradient, as select_and_scatter does.
    take = unclaimed & (tap == y)
    unclaimed = unclaimed & ~take
    parts.append((i, j, jnp.where(take, dy, zero)))
  if window == stride and padding == (0, 0):
    # Windows do not overlap: interleave the parts (one copy) instead of summing pads.
    # 61 against 92 ms for the catdog CNN's first pool (batch 64, 128×128×32).
    rows = [jnp.stack([part for a, _, part in parts if a == i], axis=3)
            for i in range(window)]  # Each [N, out_h, out_w, window, C].
    dx = jnp.stack(rows, axis=2).reshape(
        y.shape[0], out_h * window, out_w * window, y.shape[3])
    return (jnp.pad(dx, ((0, 0), (0, h - out_h * window), (0, w - out_w * window), (0, 0))),)
  dx = None
  for i, j, part in parts:
    spread = lax.pad(part, zero, (
        (0, 0, 0),
        (i, h + lo + hi - i - ((out_h - 1) * stride + 1), stride - 1),
        (j, w + lo + hi - j - ((out_w - 1) * stride + 1), stride - 1),
        (0, 0, 0)))
    dx = spread if dx is None else dx + spread
  return (dx[:, lo:lo + h, lo:lo + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: int, stride: int, padding: int | Sequence[int] = 0):
  """Square max pooling over NHWC `x`, as `nn.max_pool(x, (k, k), (s, s), padding)`.

  `padding` is one int or (low, high), applied to both spatial axes with −inf. A window
  whose maximum is NaN passes no gradient (flax's passes it to one element).
  """
  pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
  if not fast_cpu_ops():
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=(pad, pad))
  if x.ndim == 3:  # One unbatched image, as nn.max_pool accepts.
    return _max_pool(x[None], window, stride, pad)[0]
  return _max_pool(x, window, stride, pad)


# ---------------------------------------------------------------------------- convolution

def _static(value):
  """`value` with lists turned into tuples, so it can be a static (hashed) argument."""
  if type(value) in (list, tuple):
    return tuple(_static(v) for v in value)
  return value


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, options):
  return lax.conv_general_dilated(x, w, **dict(options))


def _conv_fwd(x, w, options):
  return _conv(x, w, options), (x, w)


def _stored(x, w, perm):
  """`x`, read back through a conditional so that XLA transposes the stored array.

  The weight gradient's convolution wants its input with the batch and feature axes
  swapped, so XLA transposes the activation. Left to itself, XLA fuses that transpose
  with the batch-norm, ReLU and residual-add ops that made the activation, and
  recomputes them in transposed order: one such loop took 27 ms where the plain
  transpose of the stored array takes 2.5 ms (ResNet-18 layer 1, batch 32, 128 px).
  Fusion does not reach across a conditional: its operand must be stored, and the
  transpose (the branch's layout change, or XLA's copy right after it) reads that.
  Both branches are the same function, so whichever the predicate picks, the result is
  `x`, bit for bit. The predicate reads the weights: under `jax.vmap` with shared
  weights it stays a plain boolean and the conditional stays a conditional.
  """
  if x.size == 0 or w.size == 0:
    return x
  flip = lambda a: jnp.transpose(a, perm)
  flipped = lax.cond(w.reshape(-1)[0] > 0, flip, flip, x)
  return jnp.transpose(flipped, perm)  # perm swaps two axes: its own inverse.


def _conv_bwd(options, residuals, dy):
  x, w = residuals
  kwargs = dict(options)
  conv = functools.partial(lax.conv_general_dilated, **kwargs)
  # Linear transposes: no forward convolution is evaluated, even outside jit.
  dx, = jax.linear_transpose(lambda a: conv(a, w), x)(dy)
  specs = lax.conv_dimension_numbers(x.shape, w.shape, kwargs["dimension_numbers"])
  batch, feature = specs.lhs_spec[:2]
  perm = list(range(x.ndim))
  perm[batch], perm[feature] = feature, batch
  xs = _stored(x, w, tuple(perm))
  dw, = jax.linear_transpose(lambda b: conv(xs, b), w)(dy)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         out_sharding=None):
  """`lax.conv_general_dilated`, faster on XLA:CPU.

  oneDNN's kernels where `_onednn_geometry` accepts the call: values and gradients of
  every order equal lax's to float32 rounding (tested). Elsewhere XLA's own, with a
  faster weight gradient: lax's values and gradients bit for bit, under jit, pmap and
  vmap (tested). Reverse-mode only, like this module's batch norm (no `jax.jvp`).
  """
  options = dict(window_strides=_static(window_strides), padding=_static(padding),
                 lhs_dilation=_static(lhs_dilation), rhs_dilation=_static(rhs_dilation),
                 dimension_numbers=_static(dimension_numbers),
                 feature_group_count=feature_group_count,
                 batch_group_count=batch_group_count, precision=_static(precision),
                 preferred_element_type=preferred_element_type)
  if out_sharding is not None:
    options["out_sharding"] = out_sharding
  g = _onednn_geometry(lhs, rhs, options)
  if g is not None:
    return onednn.conv(lhs, rhs, g)
  return _conv(lhs, rhs, tuple(sorted(options.items())))


_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))


def _onednn_geometry(x, w, options) -> tuple[int, ...] | None:
  """oneDNN's geometry for this convolution, or None where XLA's must run it.

  oneDNN takes float32 2-D convolutions over NHWC inputs with HWIO weights (flax's
  layout), one feature group, no dilation and padding of at least zero.
  """
  if (x.ndim != 4 or w.ndim != 4 or x.dtype != jnp.float32 or w.dtype != jnp.float32
      or options["preferred_element_type"] not in (None, jnp.float32)
      or options["feature_group_count"] != 1 or options["batch_group_count"] != 1
      or "out_sharding" in options
      or any(d not in (None, (1, 1)) for d in (options["lhs_dilation"],
                                                options["rhs_dilation"]))):
    return None
  if lax.conv_dimension_numbers(x.shape, w.shape,
                                options["dimension_numbers"]) != _NHWC_HWIO:
    return None
  strides, padding = options["window_strides"], options["padding"]
  if isinstance(padding, str):
    try:
      padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
    except Exception:  # Sizes lax cannot pad here, or a padding name it does not know:
      return None      # XLA's path handles them, or reports them as lax does.
  return onednn.geometry(x.shape, w.shape, tuple(strides), _static(padding))


def conv(features: int, kernel_size: Sequence[int], **kwargs) -> nn.Module:
  """`flax.linen.Conv`; on the CPU backend with this module's convolution.

  The variables are the same either way.
  """
  if fast_cpu_ops():
    kwargs.setdefault("conv_general_dilated", conv_general_dilated)
  return nn.Conv(features, kernel_size, **kwargs)
