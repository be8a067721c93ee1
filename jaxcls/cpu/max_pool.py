"""Max pooling's gradient on XLA:CPU without `select_and_scatter`.

The gradient of `lax.reduce_window` with `max` (what `flax.linen.max_pool` runs) is
`select_and_scatter_add`, which XLA:CPU runs as a slow scalar loop. `install()`
registers, for the CPU platform only, another lowering of that primitive: it keeps the
same rule (the first maximum in window order, row-major over the window, takes the
gradient; with a NaN in the window, the element XLA's in-order scan ends on) but builds
the result from masked copies of the incoming gradient, one per window offset. Where windows do not overlap (window = stride, no padding, e.g. the
catdog CNN's 2×2/2 pool) the copies are interleaved in one pass (61 against 436 ms at
batch 64, 128 px); where they overlap (ResNet's 3×3/2 stem pool) each copy is spread
with a strided pad and the copies are added (26–60 against 89–163 ms at batch 32).

Any model that pools with `lax.reduce_window(..., lax.max, ...)` gets it, whatever
library wrote the model. The lowering is registered once, for the whole process; a
program lowered inside `jaxcls.cpu.disabled()`, or a case this file does not handle
(another select function, an integer dtype), gets JAX's own lowering. Results: the same
gradient; where windows overlap, the up to four contributions an input element gets are
added in window order, which can round differently from XLA's scatter. A window whose
maximum is NaN passes its gradient to the element XLA's does (tested).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading

import jax.numpy as jnp
from jax import lax
from jax.interpreters import mlir

from jaxcls.cpu import switch

log = logging.getLogger(__name__)
_lock = threading.Lock()
_installed: bool | None = None  # None: not tried yet; False: JAX lacks what it needs.


def _window_taps(operand, window, strides, padding):
  """(offset, strided view) for each window offset, over `operand` padded with −inf."""
  padded = lax.pad(operand, jnp.array(-jnp.inf, operand.dtype),
                   [(lo, hi, 0) for lo, hi in padding])
  out_shape = [(size + lo + hi - w) // s + 1
               for size, w, s, (lo, hi) in zip(operand.shape, window, strides, padding)]
  for offset in itertools.product(*(range(w) for w in window)):
    limit = [o + (n - 1) * s + 1 for o, n, s in zip(offset, out_shape, strides)]
    yield offset, lax.slice(padded, offset, limit, strides)


def _interleave(parts, window, out_shape, in_shape, dtype):
  """Non-overlapping windows: each input element is in one window; one copy puts the
  masked parts (in offset order) back where they came from."""
  stacked = jnp.stack(parts, axis=-1).reshape(tuple(out_shape) + tuple(window))
  rank = len(out_shape)
  order = [axis for d in range(rank) for axis in (d, rank + d)]
  spread = stacked.transpose(order).reshape([n * w for n, w in zip(out_shape, window)])
  pad = [(0, size - n * w, 0) for size, n, w in zip(in_shape, out_shape, window)]
  return lax.pad(spread, jnp.zeros((), dtype), pad)


def scatter_gradient(source, operand, window, strides, padding):
  """`select_and_scatter_add(source, operand, ge, window, strides, padding)`."""
  if source.size == 0:  # Windows larger than the input: no output, no gradient (as XLA).
    return jnp.zeros(operand.shape, source.dtype)
  taps = list(_window_taps(operand, window, strides, padding))
  # XLA's select_and_scatter walks each window in order and moves its pick to the next
  # element whenever `pick >= element` is false: the first maximum when there is no NaN;
  # a NaN is picked and then given up to the element after it (which `>=` never keeps).
  pick, picked = taps[0][1], jnp.zeros(taps[0][1].shape, jnp.int8)  # ≤ 64 offsets.
  for index, (_, tap) in enumerate(taps[1:], 1):
    move = ~(pick >= tap)
    pick = jnp.where(move, tap, pick)
    picked = jnp.where(move, jnp.int8(index), picked)
  zero = jnp.zeros((), source.dtype)
  parts = [(offset, jnp.where(picked == index, source, zero))
           for index, (offset, _) in enumerate(taps)]
  if tuple(window) == tuple(strides) and all(p == (0, 0) for p in padding):
    return _interleave([part for _, part in parts], window, picked.shape, operand.shape,
                       source.dtype)
  total = None
  for offset, part in parts:
    # Back to the padded input's coordinates: interior padding undoes the stride.
    spread = lax.pad(part, zero, [
        (o, size + lo + hi - o - ((n - 1) * s + 1), s - 1)
        for o, size, (lo, hi), n, s in zip(offset, operand.shape, padding, part.shape,
                                           strides)])
    total = spread if total is None else total + spread
  starts = [lo for lo, _ in padding]
  return lax.slice(total, starts, [lo + size for lo, size in zip(starts, operand.shape)])


def _handled(select_prim, operand_aval, window) -> bool:
  return (select_prim is lax.ge_p and jnp.issubdtype(operand_aval.dtype, jnp.floating)
          and all(isinstance(d, int) for d in operand_aval.shape)
          and math.prod(window) <= 64)  # One masked copy per offset: keep it bounded.


def install() -> bool:
  """Registers the CPU lowering once per process; False if this JAX lacks the hooks."""
  global _installed
  with _lock:
    if _installed is not None:
      return _installed
    try:
      from jax._src.interpreters import mlir as mlir_internal
      from jax._src.lax import windowed_reductions
      primitive = windowed_reductions.select_and_scatter_add_p
      entry = (mlir_internal._platform_specific_lowerings["cpu"].get(primitive)
               or mlir_internal._lowerings[primitive])
      jax_rule = entry.rule
    except (ImportError, AttributeError, KeyError) as error:
      log.warning("jaxcls.cpu: max-pool gradient left to XLA (%r).", error)
      _installed = False
      return False
    ours = mlir.lower_fun(
        lambda source, operand, *, select_prim, window_dimensions, window_strides,
        padding: scatter_gradient(source, operand, window_dimensions, window_strides,
                                  padding), multiple_results=False)

    def rule(ctx, source, operand, *, select_prim, window_dimensions, window_strides,
             padding):
      params = dict(select_prim=select_prim, window_dimensions=window_dimensions,
                    window_strides=window_strides, padding=padding)
      if switch.turned_off() or not _handled(select_prim, ctx.avals_in[1],
                                             window_dimensions):
        return jax_rule(ctx, source, operand, **params)
      return ours(ctx, source, operand, **params)

    mlir.register_lowering(primitive, rule, platform="cpu", inline=entry.inline)
    _installed = True
    return True

