"""What JAX will run on, asked before it starts: the facts `jaxcls.gpu` and `jaxcls.cpu`
both decide from (XLA_FLAGS is read once, when JAX starts its backends).

Imports nothing heavy (no JAX): it only looks at modules already imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys


def jaxlib_release() -> tuple[int, int] | None:
  """(major, minor) of the installed jaxlib, or None when it is missing or unreadable."""
  try:
    parts = importlib.metadata.version("jaxlib").split(".")
    return int(parts[0]), int(parts[1])
  except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
    return None


def backend_started() -> bool:
  """Whether JAX has started its backends (XLA_FLAGS is read then, and never again)."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  started = getattr(bridge, "backends_are_initialized", None)
  return bool(started and started())


def requested_platforms(environ) -> str:
  """JAX's platform list as JAX will read it: its config if JAX is imported, else the
  environment (JAX_PLATFORMS, or the older JAX_PLATFORM_NAME)."""
  jax = sys.modules.get("jax")
  configured = getattr(getattr(jax, "config", None), "jax_platforms", None)
  if configured:
    return configured
  return environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""


def first_requested_platform(environ) -> str:
  """The platform JAX tries first, lower case; "" when JAX will choose for itself."""
  return requested_platforms(environ).lower().split(",")[0].strip()


def jax_plugins() -> list[str]:
  """JAX's installed PJRT plugins: modules of the `jax_plugins` namespace package, then
  the `jax_plugins` entry points as "name=module"."""
  found = []
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    import pkgutil  # pylint: disable=import-outside-toplevel
    found += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
  found += [f"{entry.name}={entry.value}"
            for entry in importlib.metadata.entry_points(group="jax_plugins")]
  return found
