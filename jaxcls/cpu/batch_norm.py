"""`flax.linen.BatchNorm` in training mode, rewritten for XLA:CPU: same variables, same
statistics, a hand-written derivative.

XLA:CPU fuses per-channel sums over [N, H, W] (the statistics in the forward pass, the
scale/bias gradients and the statistics' cotangents in the backward pass) with their
elementwise neighbours into loops that walk the activations with a stride of one row per
channel. Written as matrix-vector products (`ones @ z`) the same sums run in the dot
library: ResNet-18's forward + backward took 0.72 of its time with flax's layer
(128 px, batch 32, 2-core CPU).

`normalize(module, x)` is what `jaxcls.cpu` runs in place of `nn.BatchNorm.__call__`
when the module is in training mode and `supported(module, ...)` holds: the feature axis
last, no mask or axis groups, float32 parameters, flax's default (fast) variance and
float32 reductions. It creates the module's variables exactly as flax does (`params`:
`scale`, `bias` with the module's initializers; `batch_stats`: `mean`, `var`), computes
the biased batch variance E[x²] − E[x]² as flax does, and updates the running averages
with flax's rule (momentum × old + (1 − momentum) × batch), averaging over `axis_name`.

Its derivative is a hand-written forward-mode rule (a custom JVP), which JAX transposes
into the backward pass, so `jax.jvp`, `jax.grad` and their compositions (Hessian-vector
products) all work. One difference from flax's layer, which jaxcls does not rely on: no
gradient flows through the running averages.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.interpreters import ad, batching, mlir

_MAX_GROUPS = 64


def channel_sums(z: jax.Array) -> jax.Array:
  """Σ over every axis but the last, as a matrix-vector product (float32).

  The M rows are first folded side by side into k groups ([M, C] → [M/k, k·C], k the
  largest power of two up to 64 that divides M), so the product accumulates k shorter
  sums, which are then added. One long float32 sum in the dot library drifted: over
  1,048,576 rows of mean 3 and std 1, the variance E[x²] − E[x]² came out 6.6e-4 off
  (relative), folded 1.1e-5 (flax's: 2.2e-5); the wider product is faster too. M has such
  factors whenever the batch or the image sides are even; otherwise (or when M is
  symbolic) k = 1.
  """
  channels = z.shape[-1]
  rows = z.reshape(-1, channels).astype(jnp.float32)
  count = rows.shape[0]
  groups = math.gcd(count, _MAX_GROUPS) if isinstance(count, int) else 1
  folded = rows.reshape(count // groups, groups * channels)
  partial = jnp.ones((folded.shape[0],), jnp.float32) @ folded
  return partial.reshape(groups, channels).sum(axis=0)


def statistics(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Batch mean and biased variance per channel, averaged over `axis_name`'s devices."""
  count = x.size // x.shape[-1]
  xf = x.astype(jnp.float32)
  moments = jnp.stack([channel_sums(xf), channel_sums(xf * xf)]) / count
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name)
  mean = moments[0]
  # E[x²] − E[x]², as flax computes it by default (use_fast_variance=True).
  var = jnp.maximum(moments[1] - mean * mean, 0.0)
  return mean, var


def _broadcast(v, *, shape):
  return lax.broadcast_in_dim(v, shape, (len(shape) - 1,))


# Per-channel values spread over [..., C]: a plain broadcast, whose transpose (what the
# backward pass runs where the forward pass broadcast) is `channel_sums`, a
# matrix-vector product, rather than XLA's strided reduction.
_broadcast_p = jax.extend.core.Primitive("jaxcls_broadcast_channels")
_broadcast_p.def_impl(_broadcast)
_broadcast_p.def_abstract_eval(
    lambda v, *, shape: jax.core.ShapedArray(shape, v.dtype))
mlir.register_lowering(_broadcast_p, mlir.lower_fun(_broadcast, multiple_results=False))
ad.deflinear2(_broadcast_p,
              lambda ct, v, *, shape: [channel_sums(ct).astype(v.aval.dtype)])
batching.primitive_batchers[_broadcast_p] = lambda args, dims, *, shape: (
    jax.vmap(functools.partial(_broadcast, shape=shape), in_axes=dims)(*args), 0)


def _spread(v, shape):
  return _broadcast_p.bind(v, shape=tuple(shape))


def _forward(x, scale, bias, epsilon, axis_name):
  """(y, mean, var), and what the tangents need: x in float32 centred, and 1/σ."""
  mean, var = statistics(x, axis_name)
  inv = lax.rsqrt(var + epsilon)
  centred = x.astype(jnp.float32) - mean
  # Centre and scale in float32, one rounding to x's dtype at the end (as flax does):
  # in bfloat16, x·mul and mean·mul would be rounded apart and then cancel.
  y = (centred * (scale * inv) + bias).astype(x.dtype)
  return (y, mean, var), (centred, inv)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _normalize_train(x, scale, bias, epsilon, axis_name):
  return _forward(x, scale, bias, epsilon, axis_name)[0]


def _normalize_train_jvp(epsilon, axis_name, primals, tangents):
  """The tangents, written so that their transpose is the backward pass wanted.

  With x̂ = (x − μ)/σ and y = γ·x̂ + β: dy = (γ/σ)·(dx − dμ) − (γ/σ³)·(x − μ)·c + x̂·dγ + dβ,
  where dμ = mean(dx) and c = mean((x − μ)·dx) = dσ²/2. Every per-channel term goes
  through `_spread`, grouped so that the transpose makes two sums, Σ dy and
  Σ (x − μ)·dy, both matrix-vector products, and dx in one elementwise pass.
  """
  x, scale, bias = primals
  tx, tscale, tbias = (None if isinstance(t, SymbolicZero) else t for t in tangents)
  (y, mean, var), (centred, inv) = _forward(x, scale, bias, epsilon, axis_name)
  mul = scale * inv
  terms, slope, shift = [], [], []  # Terms of dy; per-channel multiples of x − μ; shifts.
  t_mean = t_var = jnp.zeros_like(mean)
  if tx is not None:
    txf = tx.astype(jnp.float32)
    moments = jnp.stack([channel_sums(txf), channel_sums(centred * txf)]) / (
        x.size // x.shape[-1])
    if axis_name is not None:
      moments = lax.pmean(moments, axis_name)
    t_mean, t_var = moments[0], 2 * moments[1]
    terms.append(mul * txf)
    shift.append(-mul * t_mean)
    slope.append(-mul * inv * inv * moments[1])
  if tscale is not None:
    slope.append(tscale * inv)
  if tbias is not None:
    shift.append(tbias.astype(jnp.float32))
  if slope:
    terms.append(centred * _spread(sum(slope[1:], slope[0]), x.shape))
  if shift:
    terms.append(_spread(sum(shift[1:], shift[0]), x.shape))
  if not terms:
    terms.append(jnp.zeros(x.shape, jnp.float32))
  ty = sum(terms[1:], terms[0]).astype(y.dtype)
  return (y, mean, var), (ty, t_mean, t_var)


_normalize_train.defjvp(_normalize_train_jvp, symbolic_zeros=True)


def supported(module: nn.BatchNorm, x, use_running_average, mask) -> bool:
  """Whether `normalize` reproduces this call of flax's BatchNorm."""
  axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
  return (not use_running_average and mask is None and x.ndim >= 2
          and axis in (-1, x.ndim - 1, (-1,), (x.ndim - 1,))
          and module.axis_index_groups is None and module.use_fast_variance
          and module.force_float32_reductions
          and jnp.dtype(module.param_dtype) == jnp.float32
          and jnp.issubdtype(x.dtype, jnp.floating) and not module.is_initializing())


def normalize(module: nn.BatchNorm, x: jax.Array) -> jax.Array:
  """`module(x)` in training mode, with this file's statistics and gradient."""
  features = x.shape[-1]
  ra_mean = module.variable("batch_stats", "mean",
                            lambda s: jnp.zeros(s, jnp.float32), (features,))
  ra_var = module.variable("batch_stats", "var",
                           lambda s: jnp.ones(s, jnp.float32), (features,))
  scale = (module.param("scale", module.scale_init, (features,), module.param_dtype)
           if module.use_scale else jnp.ones((features,), jnp.float32))
  bias = (module.param("bias", module.bias_init, (features,), module.param_dtype)
          if module.use_bias else jnp.zeros((features,), jnp.float32))
  dtype = module.dtype or jnp.result_type(x, scale, bias)
  y, mean, var = _normalize_train(x.astype(dtype), scale, bias, module.epsilon,
                                  module.axis_name)
  # No gradient flows through the running averages (flax's would): nothing in jaxcls
  # differentiates them.
  mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
  ra_mean.value = module.momentum * ra_mean.value + (1.0 - module.momentum) * mean
  ra_var.value = module.momentum * ra_var.value + (1.0 - module.momentum) * var
  return y
