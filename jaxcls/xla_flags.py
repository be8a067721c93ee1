"""XLA flags that make the train step faster on CPUs; set before JAX starts its backend.

Imports nothing from JAX: XLA reads `XLA_FLAGS` once, when the first backend starts, so
the entry points call `set_default_xla_flags()` before anything touches a device.
"""

from __future__ import annotations

import os

# Measured on a 2-core Xeon (AVX-512, AMX), ResNet-18 at 128 px, batch 32: see
# notes/README-issue7.md. They only change how XLA:CPU compiles; GPU and TPU ignore them.
CPU_FLAGS: tuple[str, ...] = ()


def _cpu_only() -> bool:
  """True when JAX is restricted to the CPU, or no accelerator plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
  if platforms:
    return platforms.strip().lower() == "cpu"
  import importlib.util
  return not any(importlib.util.find_spec(name) for name in (
      "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
      "libtpu", "jax_plugins"))


def set_default_xla_flags(flags: tuple[str, ...] = CPU_FLAGS) -> str | None:
  """Adds `flags` to XLA_FLAGS when the run is on CPU and the user set no XLA_FLAGS.

  A user's XLA_FLAGS, or JAXCLS_XLA_DEFAULTS=off, leaves the environment untouched.
  Returns the value set, or None when nothing was changed.
  """
  if not flags or "XLA_FLAGS" in os.environ:
    return None
  if os.environ.get("JAXCLS_XLA_DEFAULTS", "").strip().lower() in ("0", "off", "false", "no"):
    return None
  if not _cpu_only():
    return None
  os.environ["XLA_FLAGS"] = " ".join(flags)
  return os.environ["XLA_FLAGS"]
