"""Everything that makes XLA:CPU fast, applied to any flax model from outside.

The models in `jaxcls.models` (and any a user registers) are plain `flax.linen`. On the
CPU backend, `accelerate(model.apply)` runs them with faster layers, same variables and
same results to float32 rounding:

- every `nn.Conv` calls `jaxcls.cpu.conv.conv_general_dilated`: oneDNN's kernels where
  they apply (`onednn.py`, `onednn_conv.cc`), else XLA's with a faster weight gradient;
- every `nn.BatchNorm` in training mode runs `batch_norm.normalize`: its sums as
  matrix-vector products and a hand-written gradient;
- max pooling's gradient gets its own CPU lowering (`max_pool.py`), which covers
  `nn.max_pool` and any `lax.reduce_window` max.

The first two work through flax's method interception while the wrapped function is
traced; the third is a lowering registered for the CPU platform once per process. Where
JAX's backend is not the CPU nothing here acts (`backend.py` answers; docs/cpu.md, "Off
the CPU"): no rewrite, no oneDNN build, no process option. `JAXCLS_CPU_LAYERS=0` in the environment,
or `disabled()` around tracing, turns all of it off.

Process options that only a program's entry point may set (before JAX starts) live here
too: `configure_process()` adds jaxcls's XLA:CPU option (`xla_flags.py`) and re-executes
training and benchmark commands with huge-page allocation where that helps
(`allocator.py`). `import jaxcls` sets nothing.

This package is the only place that knows about CPU kernels. Deleted, with its two call
sites (`steps.apply_model` then calls `model.apply` directly, `cli/common.py` skips
`configure_process()`), jaxcls works, slower (docs/cpu.md; tested).
"""

from __future__ import annotations

import importlib

# Loaded on first use, so that `jaxcls.cpu.process` (which programs import before JAX)
# does not import JAX through this package.
_EXPORTS = {
    "accelerate": "jaxcls.cpu.intercept", "active": "jaxcls.cpu.intercept",
    "fast_convolutions_in": "jaxcls.cpu.intercept", "status": "jaxcls.cpu.intercept",
    "ONEDNN_TARGET_PREFIX": "jaxcls.cpu.intercept", "disabled": "jaxcls.cpu.switch",
    "configure_process": "jaxcls.cpu.process",
}


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'jaxcls.cpu' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
