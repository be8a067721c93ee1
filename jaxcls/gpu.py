"""GPU settings in one place: the XLA:GPU options jaxcls's programs set on a GPU host.

One option, the one NVIDIA's JAX containers set (JAX-Toolbox's baked-in XLA_FLAGS) and
JAX's GPU performance tips list:

- `--xla_gpu_enable_latency_hiding_scheduler=true`: XLA orders the program so that the
  gradients' all-reduce across GPUs (pmap's `lax.pmean`) overlaps the backward pass's
  remaining computation. It changes no result; on one GPU there is little to overlap.

Left out: `--xla_gpu_triton_gemm_any` (matrix products by Triton; a convolutional
network's time is in cuDNN's convolutions) and the collective options for large
language models (combine thresholds, PGLE), none of which was measured here.

The other GPU setting is the model's `dtype="auto"` (bfloat16 on a GPU, see
`jaxcls.models.resolve_dtype`); docs/gpu.md says what to expect on a GPU.

`apply()`, which every jaxcls command-line program calls first (through
`jaxcls.cli.common.configure_process`), adds the option to `XLA_FLAGS`; importing jaxcls
as a library sets nothing. XLA reads `XLA_FLAGS` once, when JAX starts its backends, so
the decision is made before that, from what JAX will read (`will_be_gpu`). The option is
added only when all hold: `JAXCLS_XLA_DEFAULTS` is not `0`, the user's `XLA_FLAGS` does not
set it already (theirs wins), the installed jaxlib is one it was checked on (an option
XLA does not know aborts the process), JAX has not started a backend, and JAX will run on
a GPU. A CPU run (JAX_PLATFORMS=cpu, or no GPU plugin or no GPU device) is left as it is.

Imports nothing heavy (no JAX).
"""

from __future__ import annotations

import os

from jaxcls import platforms

# option → value: what a GPU run gets unless XLA_FLAGS sets the option already.
OPTIONS = {"--xla_gpu_enable_latency_hiding_scheduler": "true"}
# (major, minor) jaxlib releases whose XLA knows every option above.
CHECKED_JAXLIB = ((0, 10),)
_GPU_PLATFORMS = ("cuda", "rocm", "gpu")


def gpu_plugins() -> list[str]:
  """JAX's CUDA and ROCm plugins installed here (`jax_plugins` modules, entry points)."""
  return sorted({name for name in platforms.jax_plugins()
                 if "cuda" in name or "rocm" in name})


def gpu_device_present(environ) -> bool:
  """An NVIDIA or AMD GPU device file that CUDA_VISIBLE_DEVICES does not hide."""
  if environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
    return False
  return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")


def will_be_gpu(environ=os.environ) -> bool:
  """True when JAX, once started, will run on a GPU; decided without starting it.

  The first platform of JAX_PLATFORMS when that is set (cuda, rocm or gpu); otherwise
  JAX prefers a GPU when its CUDA or ROCm plugin is installed and finds a device, so:
  a plugin installed and a GPU device file present. (Were the plugin to fail to start,
  JAX would fall back to the CPU with the option set; XLA:CPU ignores XLA:GPU options.)
  """
  requested = platforms.first_requested_platform(environ)
  if requested:
    return requested in _GPU_PLATFORMS
  return bool(gpu_plugins()) and gpu_device_present(environ)


def apply(environ=os.environ) -> list[str]:
  """Adds the GPU options to `environ["XLA_FLAGS"]` when allowed; the options added."""
  if (environ.get("JAXCLS_XLA_DEFAULTS", "1") == "0"
      or platforms.jaxlib_release() not in CHECKED_JAXLIB):
    return []
  if platforms.backend_started() or not will_be_gpu(environ):
    return []
  flags = environ.get("XLA_FLAGS", "")
  given = {flag.split("=")[0] for flag in flags.split()}
  added = [f"{option}={value}" for option, value in OPTIONS.items() if option not in given]
  if added:
    environ["XLA_FLAGS"] = " ".join([flags] + added).strip()
  return added
