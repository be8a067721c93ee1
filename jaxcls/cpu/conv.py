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
import jax.extend
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad, batching, mlir

from jaxcls.cpu import onednn, switch


def _static(value):
  """`value` with lists turned into tuples, so it can be a static (hashed) argument."""
  if type(value) in (list, tuple):
    return tuple(_static(v) for v in value)
  return value


def _lax_conv(x, w, *, options):
  """lax's convolution, its options a hashable tuple of (name, value) pairs."""
  return lax.conv_general_dilated(x, w, **dict(options))


# XLA's convolution as a primitive of its own, so that its transposes (the backward
# pass) are the ones below, and forward-mode differentiation (jax.jvp) is the product rule
# through the same primitive: every order, in both modes, gets them. Its third operand,
# a boolean read from the weights, is the predicate of `_stored`'s conditional: the
# weight gradient is the transpose in `w`, which then has no value to read.
_conv_p = jax.extend.core.Primitive("jaxcls_xla_conv")
_conv_p.def_impl(lambda x, w, flag, *, options: _lax_conv(x, w, options=options))


@_conv_p.def_abstract_eval
def _conv_type(x, w, flag, *, options):
  out = jax.eval_shape(functools.partial(_lax_conv, options=options), x, w)
  if getattr(out, "sharding", None) is None:
    return jax.core.ShapedArray(out.shape, out.dtype)
  return jax.core.ShapedArray(out.shape, out.dtype, sharding=out.sharding)



mlir.register_lowering(_conv_p, mlir.lower_fun(
    lambda x, w, flag, *, options: _lax_conv(x, w, options=options),
    multiple_results=False))
# Under vmap, lax's own batched convolution (its gradient is then lax's too).
batching.primitive_batchers[_conv_p] = lambda args, dims, *, options: (jax.vmap(
    functools.partial(_lax_conv, options=options), in_axes=dims[:2])(*args[:2]), 0)


def _conv(x, w, options):
  flag = w.reshape(-1)[0] > 0 if w.size else jnp.bool_(True)
  return _conv_p.bind(x, w, flag, options=options)


def _conv_jvp(primals, tangents, *, options):
  x, w, flag = primals
  tx, tw, _ = tangents
  y = _conv_p.bind(x, w, flag, options=options)
  terms = ([_conv_p.bind(tx, w, flag, options=options)] if type(tx) is not ad.Zero else []
           ) + ([_conv_p.bind(x, tw, flag, options=options)] if type(tw) is not ad.Zero
                else [])
  if not terms:
    return y, ad.Zero(jax.typeof(y).to_tangent_aval())
  return y, functools.reduce(jnp.add, terms)


def _conv_transpose(dy, x, w, flag, *, options):
  """The transpose in whichever of `x` and `w` is the linear (undefined) operand."""
  if ad.is_undefined_primal(x):
    return [None if type(dy) is ad.Zero else _input_gradient(dy, x.aval, w, options),
            None, None]
  return [None, None if type(dy) is ad.Zero else _weight_gradient(dy, x, w.aval, flag,
                                                                  options), None]


ad.primitive_jvps[_conv_p] = _conv_jvp
ad.primitive_transposes[_conv_p] = _conv_transpose


def _stored(x, flag, perm):
  """`x`, read back through a conditional so that XLA transposes the stored array.

  The weight gradient's convolution wants its input with the batch and feature axes
  swapped, so XLA transposes the activation. Left to itself, XLA fuses that transpose
  with the batch-norm, ReLU and residual-add ops that made the activation, and
  recomputes them in transposed order: one such loop took 27 ms where the plain
  transpose of the stored array takes 2.5 ms (ResNet-18 layer 1, batch 32, 128 px).
  Fusion does not reach across a conditional: its operand must be stored, and the
  transpose (the branch's layout change, or XLA's copy right after it) reads that.
  Both branches are the same function, so whichever the predicate picks, the result is
  `x`, bit for bit. The predicate `flag` is read from the weights: under `jax.vmap` with
  shared weights it stays a plain boolean and the conditional stays a conditional.
  """
  if x.size == 0:
    return x
  flip = lambda a: jnp.transpose(a, perm)
  flipped = lax.cond(flag, flip, flip, x)
  return jnp.transpose(flipped, perm)  # perm swaps two axes: its own inverse.


def _input_gradient(dy, x_type, w, options):
  conv = functools.partial(_lax_conv, options=options)
  x_type = jax.ShapeDtypeStruct(x_type.shape, x_type.dtype)
  # Linear transposes: no forward convolution is evaluated, even outside jit.
  return jax.linear_transpose(lambda a: conv(a, w), x_type)(dy)[0]


def _weight_gradient(dy, x, w_type, flag, options):
  """lax's weight gradient, reading `x` back from where it is stored (`_stored`)."""
  specs = lax.conv_dimension_numbers(x.shape, w_type.shape,
                                     dict(options)["dimension_numbers"])
  batch, feature = specs.lhs_spec[:2]
  perm = list(range(x.ndim))
  perm[batch], perm[feature] = feature, batch
  xs = _stored(x, flag, tuple(perm)) if w_type.size else x
  w_type = jax.ShapeDtypeStruct(w_type.shape, w_type.dtype)
  return jax.linear_transpose(lambda b: _lax_conv(xs, b, options=options), w_type)(dy)[0]


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         out_sharding=None):
  """`lax.conv_general_dilated`, faster on XLA:CPU.

  oneDNN's kernels where `_onednn_geometry` accepts the call: values and gradients of
  every order equal lax's to float32 rounding (tested). Elsewhere XLA's own, with a
  faster weight gradient: lax's values and gradients bit for bit, under jit, pmap and
  vmap (tested). Both differentiate in forward mode (`jax.jvp`) as in reverse.
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
