"""Whether JAX runs on the CPU: the one question every part of `jaxcls.cpu` asks before it
acts, so that on a GPU or TPU host nothing of it does (no re-execution, no XLA option, no
compiler run, no rewrite).

Imports nothing heavy (no JAX), so the programs can ask before JAX starts.
"""

from __future__ import annotations

import importlib.util
import os

from jaxcls import platforms

_ALIASES = {"cuda": "gpu", "rocm": "gpu", "oneapi": "gpu"}


def is_cpu() -> bool:
  """True when JAX's default backend is the CPU (starts JAX's backends if need be)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.default_backend() == "cpu"


def accelerator_plugins(environ=os.environ) -> list[str]:
  """What could give JAX a backend other than the CPU: its plugins (the `jax_plugins`
  namespace and entry points, PJRT_NAMES_AND_LIBRARY_PATHS) and a TPU runtime."""
  found = platforms.jax_plugins()
  if environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
    found.append(environ["PJRT_NAMES_AND_LIBRARY_PATHS"])
  if environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  return found


def will_be_cpu(environ=os.environ) -> bool:
  """True when JAX's default backend is, or once started will be, the CPU.

  Asked before JAX starts (process options must be set then), it answers from what JAX
  will read: the first platform of JAX_PLATFORMS when that is set; otherwise the CPU
  only when nothing could give JAX another backend (`accelerator_plugins`). Where a GPU
  or TPU plugin is installed and JAX_PLATFORMS is unset, whether JAX finds its device is
  known only once it starts, so the answer is False: a program run on the CPU there gets
  the process options back with JAX_PLATFORMS=cpu.
  """
  if platforms.backend_started():
    return is_cpu()
  requested = platforms.first_requested_platform(environ)
  if requested:
    return _ALIASES.get(requested, requested) == "cpu"
  return not accelerator_plugins(environ)
