"""`lax.conv_general_dilated` for XLA:CPU: oneDNN's kernels where they apply, else XLA's
with a faster weight gradient. What `jaxcls.cpu` gives every `flax.linen.Conv` to call.

- oneDNN (`jaxcls.cpu.onednn`: Linux x86-64, the `onednn-cpu-gomp` dependency, a C++
  compiler for a one-time build) runs float32 2-D convolutions over NHWC inputs with HWIO
  weights (flax's layout), one feature group, no dilation, padding of at least zero:
  forward and both gradients, of every order.
- Everything else (other dtypes, groups, dilation, other layouts, symbolic shapes,
  anything traced inside `jaxcls.cpu.disabled()`) runs XLA's convolution. Its weight
  gradient needs the input activation with the batch and channel axes swapped; left to
  itself XLA fuses that transpose with the batch-norm, ReLU and residual-add ops that
  made the activation and recomputes them in transposed order, which is slow. Here the
  stored activation is transposed instead, with lax's results bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxcls.cpu import onednn, switch


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
  if switch.turned_off():
    return None
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
