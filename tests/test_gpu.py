"""jaxcls.gpu: the XLA:GPU options reach a GPU run's XLA_FLAGS and never a CPU run's.

Each case runs in a fresh Python (no JAX imported, as a program's first call sees it);
a GPU host is stood for by JAX_PLATFORMS=cuda, or by a faked plugin and device file.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

OPTION = "--xla_gpu_enable_latency_hiding_scheduler=true"
_PROGRAM = """
import json, os, sys
from jaxcls import gpu
if "fake-gpu" in sys.argv:  # A CUDA plugin installed and a GPU device file present.
  gpu.gpu_plugins = lambda: ["xla_cuda12"]
  gpu.gpu_device_present = lambda environ: True
if "fake-plugin-only" in sys.argv:
  gpu.gpu_plugins = lambda: ["xla_cuda12"]
if "start-jax" in sys.argv:
  import jax
  jax.devices()
  os.environ["JAX_PLATFORMS"] = "cuda"
if "program" in sys.argv:
  from jaxcls.cli import common
  common.configure_process()
  added = None
else:
  added = gpu.apply()
print(json.dumps({"added": added, "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                  "jax_imported": "jax" in sys.modules}))
"""


def _run(env_changes: dict, *flags: str) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "XLA_FLAGS",
                      "JAXCLS_XLA_DEFAULTS")}
  env.update(env_changes)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", _PROGRAM, *flags], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("env", [
    {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},  # This host: no GPU.
    {"JAX_PLATFORMS": "cpu"},
])
def test_a_cpu_run_keeps_its_xla_flags(env):
  result = _run(env)
  assert result == {"added": [], "XLA_FLAGS": env.get("XLA_FLAGS"), "jax_imported": False}


def test_a_program_on_the_cpu_gets_no_gpu_option():
  result = _run({"JAX_PLATFORMS": "cpu"}, "program")
  assert "xla_gpu" not in (result["XLA_FLAGS"] or "")


@pytest.mark.parametrize("env, flags", [
    ({"JAX_PLATFORMS": "cuda"}, ()),
    ({"JAX_PLATFORMS": "cuda,cpu"}, ()),
    ({}, ("fake-gpu",)),
])
def test_a_gpu_run_gets_the_options_before_jax_starts(env, flags):
  result = _run({**env, "XLA_FLAGS": "--xla_dump_to=/tmp/x"}, *flags)
  assert result == {"added": [OPTION], "XLA_FLAGS": f"--xla_dump_to=/tmp/x {OPTION}",
                    "jax_imported": False}


def test_the_program_entry_sets_them():
  result = _run({"JAX_PLATFORMS": "cuda"}, "program")
  assert result["XLA_FLAGS"] == OPTION


@pytest.mark.parametrize("env, flags", [
    # The user's own value wins.
    ({"JAX_PLATFORMS": "cuda",
      "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"}, ()),
    # Switched off.
    ({"JAX_PLATFORMS": "cuda", "JAXCLS_XLA_DEFAULTS": "0"}, ()),
    # A plugin without a device (a CPU host with jax[cuda] installed) is a CPU run.
    ({"CUDA_VISIBLE_DEVICES": ""}, ("fake-plugin-only",)),
    # Too late: JAX started (on the CPU here) and read XLA_FLAGS already.
    ({}, ("start-jax",)),
])
def test_the_options_are_left_out(env, flags):
  result = _run(env, *flags)
  assert result["added"] == [] and result["XLA_FLAGS"] == env.get("XLA_FLAGS")
