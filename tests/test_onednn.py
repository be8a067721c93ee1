"""oneDNN's convolutions (jaxcls/models/onednn.py): lax's values and gradients of every
order, the cases it declines, the models and a pmapped train step, the build cache, and
what happens when it cannot be built."""

import contextlib
import functools
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcls.models import layers, onednn
from jaxcls.train import replicate, root_key, train_step
from model_utils import AXIS, make_batch, make_state, model_config

_NHWC = ("NHWC", "HWIO", "NHWC")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason=f"oneDNN unavailable: {onednn.unavailable_reason()}")


def _calls(fn, *args) -> int:
  """How many calls to jaxcls's oneDNN handlers `jax.jit(fn)` compiles to."""
  return jax.jit(fn).lower(*args).compile().as_text().count("jaxcls_onednn_conv_")


def _inputs(seed, x_shape, w_shape, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=x_shape), dtype),
          jnp.asarray(rng.normal(size=w_shape) / np.sqrt(np.prod(w_shape[:3])), dtype))


def test_onednn_is_available_where_jaxcls_installs_it():
  """On Linux x86-64 the runtime is a dependency: the fast path must really be on (or
  every other test here would be skipped without a word)."""
  if platform.system() == "Linux" and platform.machine() == "x86_64":
    assert onednn.available(), onednn.unavailable_reason()
    assert onednn.unavailable_reason() is None


@needs_onednn
@pytest.mark.parametrize("size, kernel, strides, padding", [
    (9, 3, (1, 1), ((1, 1), (1, 1))),
    (9, 3, (2, 2), "SAME"),               # Odd size, stride 2: padding (1, 1).
    (8, 3, (2, 2), "SAME"),               # Even size: padding (0, 1).
    (8, 1, (2, 2), "VALID"),              # ResNet's 1×1 downsample.
    (16, 7, (2, 2), [(3, 3), (3, 3)]),    # The stem, padding as a list.
    (9, 4, (3, 2), ((2, 0), (1, 2))),     # Uneven strides and padding.
])
def test_conv_gives_lax_values_and_gradients(size, kernel, strides, padding):
  x, w = _inputs(1, (3, size, size, 5), (kernel, kernel, 5, 6))

  def loss(conv):
    def f(x, w):
      y = conv(jax.nn.relu(x), w, strides, padding, dimension_numbers=_NHWC)
      return jnp.sum(jnp.sin(y))
    return jax.value_and_grad(f, argnums=(0, 1))

  ours = jax.jit(loss(layers.conv_general_dilated))(x, w)
  theirs = jax.jit(loss(lax.conv_general_dilated))(x, w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()))
  assert float(jnp.abs(ours[1][1]).max()) > 0
  assert _calls(loss(layers.conv_general_dilated), x, w) == 3  # Forward, dx and dw.


@needs_onednn
def test_second_and_third_order_gradients_match_lax():
  x, w = _inputs(2, (2, 7, 7, 3), (3, 3, 3, 4))

  def orders(conv):
    f = lambda x, w: jnp.sum(jnp.tanh(conv(x, w, (2, 2), "SAME", dimension_numbers=_NHWC)))
    # The input gradient's size, differentiated again (a gradient penalty), and once more.
    g = lambda x, w: jnp.sum(jax.grad(f)(x, w) ** 2)
    h = lambda x, w: jnp.sum(jax.grad(g, argnums=1)(x, w) ** 2)
    return jax.jit(jax.grad(g, argnums=(0, 1))), jax.jit(jax.grad(h, argnums=(0, 1)))

  for ours, theirs in zip(orders(layers.conv_general_dilated),
                          orders(lax.conv_general_dilated)):
    for a, b in zip(ours(x, w), theirs(x, w)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
  third = jax.jit(orders(layers.conv_general_dilated)[1]).lower(x, w).compile().as_text()
  assert third.count("jaxcls_onednn_conv_") > 3 and " convolution(" not in third
  assert _calls(orders(lax.conv_general_dilated)[1], x, w) == 0


@needs_onednn
@pytest.mark.parametrize("case", ["bfloat16", "groups", "dilation", "nchw", "empty",
                                  "window_past_input", "disabled"])
def test_declined_cases_run_xla_convolution_with_lax_results(case):
  """What oneDNN's path does not take goes to XLA's, with lax's results bit for bit."""
  dims, groups, dilation, dtype, x_shape = _NHWC, 1, (1, 1), jnp.float32, (2, 8, 8, 4)
  padding, strides = "SAME", (1, 1)
  w_shape = (3, 3, 4, 6)
  if case == "bfloat16":
    dtype = jnp.bfloat16
  elif case == "groups":
    groups, w_shape = 2, (3, 3, 2, 6)
  elif case == "dilation":
    dilation = (2, 2)
  elif case == "nchw":
    dims, x_shape, w_shape = ("NCHW", "OIHW", "NCHW"), (2, 4, 8, 8), (6, 4, 3, 3)
  elif case == "empty":
    x_shape = (0, 8, 8, 4)
  elif case == "window_past_input":  # Stride 2, a 3×3 window over 2×2: no output.
    x_shape, padding, strides = (2, 2, 2, 4), "VALID", (2, 2)
  x, w = _inputs(3, x_shape, w_shape, dtype)

  def loss(conv):
    f = lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, rhs_dilation=dilation,
                                          dimension_numbers=dims,
                                          feature_group_count=groups)))
    return jax.grad(f, argnums=(0, 1))

  if case == "disabled":
    with onednn.disabled():
      assert _calls(loss(layers.conv_general_dilated), x, w) == 0
    assert _calls(loss(layers.conv_general_dilated), x, w) == 3
    return
  assert _calls(loss(layers.conv_general_dilated), x, w) == 0
  for a, b in zip(jax.jit(loss(layers.conv_general_dilated))(x, w),
                  jax.jit(loss(lax.conv_general_dilated))(x, w)):
    np.testing.assert_array_equal(a, b)


@needs_onednn
def test_per_example_gradients_under_vmap_match_lax():
  x, w = _inputs(4, (3, 2, 8, 8, 4), (3, 3, 4, 5))

  def per_example(conv):
    def f(w, x):
      return jnp.sum(jnp.sin(conv(jax.nn.relu(x), w, (1, 1), "SAME",
                                  dimension_numbers=_NHWC)))
    return jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0)))

  ours, theirs = per_example(layers.conv_general_dilated), per_example(lax.conv_general_dilated)
  np.testing.assert_allclose(ours(w, x), theirs(w, x), rtol=1e-5, atol=1e-5)
  assert "jaxcls_onednn_conv_backward_weights" in ours.lower(w, x).compile().as_text()


@needs_onednn
@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_pmapped_train_step_matches_xla_convolutions_on_8_devices(name):
  """A whole train step, pmapped over 8 CPU devices that call oneDNN at once: the same
  loss and parameters as with XLA's convolutions, to float32 rounding."""
  devices = jax.local_devices()
  assert len(devices) == 8
  state = make_state(model_config(name), num_classes=3, image_size=16)
  batch = make_batch(8, 2, 16, 3)
  args = (replicate(state, devices), batch, root_key(1))

  def run(use_onednn):
    # A new function each time: JAX would reuse a trace of the same one.
    step = jax.pmap(functools.partial(train_step, flip=True, rotation=0.0, scale=(1.0, 1.0)),
                    axis_name=AXIS, devices=devices, in_axes=(0, 0, None))
    with contextlib.nullcontext() if use_onednn else onednn.disabled():
      compiled = step.lower(*args).compile()
    assert ("jaxcls_onednn_conv_" in compiled.as_text()) == use_onednn
    new, metrics = jax.device_get(compiled(*args))
    return metrics["loss"], jax.tree.map(lambda x: x[0], new.params)

  (our_loss, ours), (their_loss, theirs) = run(True), run(False)
  np.testing.assert_allclose(our_loss, their_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert not np.allclose(ours["head"]["kernel"], state.params["head"]["kernel"])


def _probe(env: dict, code: str) -> subprocess.CompletedProcess:
  full_env = {**os.environ, **env}
  return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                        text=True, timeout=300, cwd=ROOT)


_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jaxcls.models import layers, onednn
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
w = jnp.ones((3, 3, 3, 4), jnp.float32)
f = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
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
