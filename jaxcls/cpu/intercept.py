"""`accelerate(apply_fn)`: the CPU layers of `jaxcls.cpu`, applied through flax's method
interception while a model is traced for the CPU backend (see the package docstring)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax

from jaxcls.cpu import backend, batch_norm, conv, max_pool, onednn, switch

ONEDNN_TARGET_PREFIX = onednn.TARGET_PREFIX


def active() -> bool:
  """True when a function traced now gets the CPU layers."""
  return backend.is_cpu() and not switch.turned_off()


def _intercept(next_fun, args, kwargs, context):
  """Flax method interceptor: nn.Conv and nn.BatchNorm calls take the CPU layers."""
  module = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if (isinstance(module, nn.Conv) and module.conv_general_dilated is None
      and module.conv_general_dilated_cls is None):
    # nn.Conv's own hook for another convolution function, set for this call only.
    object.__setattr__(module, "conv_general_dilated", conv.conv_general_dilated)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "conv_general_dilated", None)
  if type(module) is nn.BatchNorm and args:
    use_running_average = kwargs.get(
        "use_running_average", args[1] if len(args) > 1 else None)
    if use_running_average is None:
      use_running_average = module.use_running_average
    if batch_norm.supported(module, args[0], use_running_average, kwargs.get("mask")):
      return batch_norm.normalize(module, args[0])
  return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Accelerated:
  """`fn` (a flax `apply`), run with the CPU layers when traced for the CPU backend.

  Equal when `fn` is equal, so jit and pmap caches keyed on it keep hitting.
  """
  fn: Callable[..., Any]

  def __call__(self, *args, **kwargs):
    if not active():
      return self.fn(*args, **kwargs)
    max_pool.install()
    with nn.intercept_methods(_intercept):
      return self.fn(*args, **kwargs)


def accelerate(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` with jaxcls's CPU layers (listed in the `jaxcls.cpu` docstring)."""
  if isinstance(apply_fn, Accelerated):
    return apply_fn
  return Accelerated(apply_fn)


def fast_convolutions_in(compiled_text: str) -> bool:
  """True when a compiled program's text calls oneDNN's convolutions."""
  return ONEDNN_TARGET_PREFIX in compiled_text


def status() -> dict:
  """What this process would use: for benchmarks' JSON and for bug reports."""
  result = {"cpu_layers": active(), "onednn_available": onednn.available()}
  if not result["onednn_available"]:
    result["onednn_unavailable"] = onednn.unavailable_reason()
  return result
