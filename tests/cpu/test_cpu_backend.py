"""jaxcls.cpu where JAX's backend is not the CPU: nothing of it acts. The backend is faked
(jax.default_backend, the plugins JAX would find, JAX_PLATFORMS); every act of the
package is replaced by one that fails the test: re-executing the program, changing the
environment, building or loading oneDNN, registering the max-pool lowering, rewriting a
model. Each test also runs the same code on the CPU, where it must act, so that it can
fail."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax._src import xla_bridge

from jaxcls import cpu, steps
from jaxcls import platforms as jax_platforms  # Tests below take a "platforms" parameter.
from jaxcls.cpu import allocator, backend, max_pool, onednn, process, xla_flags


class Acted(Exception):
  """What a replaced act raises."""


def _refuse(what):
  def act(*args, **kwargs):
    raise Acted(what)
  return act


@pytest.fixture
def fresh_onednn():
  """oneDNN's library looked up again in the test, and again after it (for the real host)."""
  onednn._library.cache_clear()
  yield
  onednn._library.cache_clear()


def _before_jax_starts(monkeypatch, *, platforms: str, plugins: list[str]):
  """As a program sees it before JAX starts: JAX_PLATFORMS and JAX's plugins faked."""
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  monkeypatch.setattr(jax_platforms, "jaxlib_release", lambda: (0, 10))  # Measured on.
  # JAX's own setting, which it took from JAX_PLATFORMS when imported.
  monkeypatch.setattr(jax_platforms, "requested_platforms",
                      lambda environ: environ.get("JAX_PLATFORMS", ""))
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.delenv("JAX_PLATFORM_NAME", raising=False)
  monkeypatch.setattr(backend, "accelerator_plugins", lambda environ=None: plugins)
  # A host where the allocator re-execution would be worth it, and a script to re-run.
  monkeypatch.setattr(allocator, "glibc_version", lambda: (2, 39))
  monkeypatch.setattr(allocator, "thp_mode", lambda: "madvise")
  monkeypatch.setattr(allocator, "_can_reexecute", lambda argv: True)
  for name in ("JAXCLS_ALLOCATOR_DEFAULTS", "JAXCLS_XLA_DEFAULTS", "XLA_FLAGS",
               "GLIBC_TUNABLES", "LD_PRELOAD", allocator._MARKER):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(os, "execve", _refuse("re-executed the program"))
  monkeypatch.setattr(os, "execv", _refuse("re-executed the program"))


@pytest.mark.parametrize("platforms, plugins", [
    ("cuda", []),                     # JAX_PLATFORMS names a GPU.
    ("tpu,cpu", []),                  # The first platform listed is the default.
    ("", ["jax_cuda12_plugin"]),      # Unset, with a GPU plugin installed.
])
def test_programs_set_no_process_option_for_another_backend(monkeypatch, platforms,
                                                            plugins):
  _before_jax_starts(monkeypatch, platforms=platforms, plugins=plugins)
  before = dict(os.environ)
  process.configure_process(tune_allocator=True)  # Raises Acted if it re-executes.
  assert dict(os.environ) == before
  env = dict(os.environ)
  assert not xla_flags.apply(env) and env == before
  assert allocator.tuned_environment_here(env) is None


@pytest.mark.parametrize("platforms", ["cpu", ""])
def test_on_the_cpu_the_same_programs_do_set_them(monkeypatch, platforms):
  _before_jax_starts(monkeypatch, platforms=platforms, plugins=[])
  env = dict(os.environ)
  assert xla_flags.apply(env) and xla_flags.OPTION in env["XLA_FLAGS"]
  with pytest.raises(Acted, match="re-executed"):
    process.configure_process(tune_allocator=True)
  assert xla_flags.OPTION in os.environ["XLA_FLAGS"]


def test_once_jax_has_started_its_default_backend_decides(monkeypatch):
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # Read at start; the backend now answers.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not backend.will_be_cpu() and not backend.is_cpu()
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert backend.will_be_cpu() and backend.is_cpu()


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.max_pool(x, (2, 2), strides=(2, 2)).sum()


def _traced(monkeypatch, default_backend: str) -> str:
  """The jaxpr of a gradient through `steps.apply_model`, with JAX's backend faked."""
  monkeypatch.setattr(jax, "default_backend", lambda: default_backend)
  model = _Net()
  x = jnp.ones((2, 6, 6, 3))
  variables = model.init(jax.random.key(0), x)
  apply = steps.apply_model(model)
  loss = lambda params: apply({**variables, "params": params}, x,
                              mutable=["batch_stats"])[0]
  return str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))


def test_off_the_cpu_no_library_is_built_and_no_model_is_rewritten(monkeypatch,
                                                                     fresh_onednn):
  monkeypatch.setattr(onednn, "_build", _refuse("built oneDNN's bridge"))
  monkeypatch.setattr(onednn.subprocess, "run", _refuse("ran the compiler"))
  monkeypatch.setattr(onednn.ctypes, "CDLL", _refuse("loaded oneDNN's bridge"))
  monkeypatch.setattr(max_pool, "install", _refuse("registered the max-pool lowering"))
  text = _traced(monkeypatch, "gpu")
  assert "jaxcls" not in text and "_normalize_train" not in text  # flax's layers.
  assert not onednn.available()
  assert onednn.unavailable_reason() == "JAX's default backend is gpu, not the CPU"
  assert cpu.status() == {"cpu_layers": False, "onednn_available": False,
                          "onednn_unavailable": onednn.unavailable_reason()}
  with pytest.raises(Acted, match="max-pool"):  # On the CPU the same trace acts.
    _traced(monkeypatch, "cpu")
