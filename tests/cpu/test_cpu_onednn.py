"""The oneDNN bridge (jaxcls/cpu/onednn.py): available where jaxcls installs it, built once
and reused, and when it cannot be built, XLA's convolution with the reason given."""

import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT
from jaxcls.cpu import onednn

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.

needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason=f"oneDNN unavailable: {onednn.unavailable_reason()}")


def test_onednn_is_available_where_jaxcls_installs_it():
  """On Linux x86-64 the runtime is a dependency: the fast path must really be on (or
  every other test here would be skipped without a word)."""
  if platform.system() == "Linux" and platform.machine() == "x86_64":
    assert onednn.available(), onednn.unavailable_reason()
    assert onednn.unavailable_reason() is None


def _probe(env: dict, code: str) -> subprocess.CompletedProcess:
  full_env = {**os.environ, **env}
  return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                        text=True, timeout=300, cwd=ROOT)


_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jaxcls.cpu import conv, onednn

x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
w = jnp.ones((3, 3, 3, 4), jnp.float32)
f = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
print("available", onednn.available())
print("reason", onednn.unavailable_reason())
print("close", bool(np.allclose(jax.jit(f)(x, w), ref, rtol=1e-5, atol=1e-5)))
print("calls", jax.jit(f).lower(x, w).compile().as_text().count("jaxcls_onednn_conv_"))
"""


def _parse(done: subprocess.CompletedProcess) -> dict:
  assert done.returncode == 0, done.stderr
  return dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)


@needs_onednn
def test_built_library_is_reused_without_a_compiler(tmp_path):
  cache = str(tmp_path / "cache")
  first = _parse(_probe({"JAXCLS_CACHE_DIR": cache}, _PROBE))
  assert first["available"] == "True" and first["close"] == "True" and first["calls"] == "1"
  built = sorted(os.listdir(cache))
  assert len(built) == 1 and built[0].startswith("onednn_conv-") and built[0].endswith(".so")
  stamp = os.stat(os.path.join(cache, built[0])).st_mtime_ns
  # No compiler now: the cached library is used as it is.
  second = _parse(_probe({"JAXCLS_CACHE_DIR": cache, "CXX": "/nonexistent/c++"}, _PROBE))
  assert second["available"] == "True" and second["calls"] == "1"
  assert os.stat(os.path.join(cache, built[0])).st_mtime_ns == stamp


@pytest.mark.parametrize("env, reason", [
    ({"JAXCLS_ONEDNN": "0"}, "JAXCLS_ONEDNN=0"),
    pytest.param({"CXX": "/nonexistent/c++"}, "no C++ compiler ('/nonexistent/c++' not found",
                 marks=needs_onednn),  # Else an earlier check gives its own reason.
])
def test_without_onednn_the_convolution_is_xla_s_with_the_reason_given(tmp_path, env, reason):
  done = _probe({"JAXCLS_CACHE_DIR": str(tmp_path / "empty"), **env}, _PROBE)
  result = _parse(done)
  assert result["available"] == "False"
  assert reason in result["reason"]
  assert result["close"] == "True" and result["calls"] == "0"
  if "CXX" in env:
    assert "oneDNN convolutions unavailable, XLA's are used" in done.stderr  # Said once.
    assert done.stderr.count("oneDNN convolutions unavailable") == 1
