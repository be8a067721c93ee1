"""The XLA:CPU option jaxcls's programs set, before JAX starts its backend.

One option, measured on jaxlib 0.10.2 (ResNet-18, 128 px, batch 32, 2-core CPU):

- `--xla_cpu_experimental_ynn_fusion_type=individual_dot` keeps XLA:CPU's YNNPACK
  library for matrix products but gives convolutions back to Eigen. YNNPACK's
  convolutions are slow at the weight-gradient shapes a train step needs (the window
  as large as the image, e.g. 110 against 39 ms for the 7×7 stem at batch 32), and the
  whole compiled gradient took 0.93 of the default's time in the same process.

`jaxcls.cpu.process.configure_process()`, which every jaxcls command-line program calls
first, adds it to `XLA_FLAGS`; importing jaxcls as a library sets nothing. It does so
only when all hold: `JAXCLS_XLA_DEFAULTS` is not `0`, the user's `XLA_FLAGS` does not set
the same option, the installed jaxlib is one it was measured on (0.10.x), JAX has not
started a backend yet (flags are read once), and JAX will run on the CPU
(`jaxcls.cpu.backend.will_be_cpu`): on a GPU or TPU host `XLA_FLAGS` is left as it is.
"""

from __future__ import annotations

import os

from jaxcls import platforms
from jaxcls.cpu import backend

OPTION = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "individual_dot"
MEASURED_JAXLIB = ((0, 10),)  # (major, minor) releases the option was measured on.


def apply(environ=os.environ) -> bool:
  """Adds jaxcls's XLA option to `environ["XLA_FLAGS"]` when allowed; True if added."""
  if environ.get("JAXCLS_XLA_DEFAULTS", "1") == "0":
    return False
  flags = environ.get("XLA_FLAGS", "")
  if (OPTION in flags or platforms.jaxlib_release() not in MEASURED_JAXLIB
      or platforms.backend_started()):
    return False
  if not backend.will_be_cpu(environ):
    return False
  environ["XLA_FLAGS"] = f"{flags} {OPTION}={VALUE}".strip()
  return True
