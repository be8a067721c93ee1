"""One switch for all of jaxcls.cpu: `disabled()` turns every CPU rewrite off while code
is traced and lowered inside it; `JAXCLS_CPU_LAYERS=0` turns them off for the process."""

from __future__ import annotations

import contextlib
import contextvars
import os

_disabled = contextvars.ContextVar("jaxcls_cpu_disabled", default=False)


@contextlib.contextmanager
def disabled():
  """Inside, models trace and lower with flax's and XLA's own layers and convolutions.

  For programs that leave this process (`jax.export`: they must not call a library only
  this process has registered) and for comparisons. It acts when a function is traced
  and lowered: a program JAX has already compiled and cached keeps what it was built with.
  """
  token = _disabled.set(True)
  try:
    yield
  finally:
    _disabled.reset(token)


def turned_off() -> bool:
  """True inside `disabled()` or with JAXCLS_CPU_LAYERS=0 in the environment."""
  return _disabled.get() or os.environ.get("JAXCLS_CPU_LAYERS", "1") == "0"
