"""oneDNN's convolutions inside XLA:CPU programs, built on first use.

XLA:CPU runs convolutions with Eigen, which packs image patches; oneDNN (the library
behind PyTorch's CPU convolutions) reads NHWC directly. `onednn_conv.cc` wraps oneDNN's
forward, input-gradient and weight-gradient convolutions as XLA FFI handlers. This
module compiles it once per version of the source, jaxlib and oneDNN runtime (a C++17
compiler, `$CXX` or `g++`, and the `onednn-cpu-gomp` package are needed; about 2 s),
keeps the library under `$JAXCLS_CACHE_DIR` (default `$XDG_CACHE_HOME/jaxcls`, else
`~/.cache/jaxcls`), registers the handlers with JAX and offers `conv` (forward) with its
gradients as JAX functions.

Anything missing (not Linux x86-64, no compiler, no oneDNN runtime, `JAXCLS_ONEDNN=0`)
makes `available()` False with the reason in `unavailable_reason()`, and
`jaxcls.cpu.conv` uses XLA's convolution instead: same variables, same checkpoints.

oneDNN runs on GNU OpenMP's threads (`OMP_NUM_THREADS`, default: all cores). Like JAX
itself, it is not safe to use in a child forked after the parent ran a convolution
(OpenMP's threads do not survive `fork`): jaxcls's loader uses threads, and its
benchmarks start processes with `spawn`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad, batching, mlir

from jaxcls.cpu import backend

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
RUNTIME_PACKAGE = "onednn-cpu-gomp"
TARGETS = ("forward", "backward_data", "backward_weights")
TARGET_PREFIX = "jaxcls_onednn_conv_"  # The handlers' symbols in onednn_conv.cc.
_reason: str | None = None


def cache_dir() -> pathlib.Path:
  """Where the compiled library is kept."""
  root = os.environ.get("JAXCLS_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxcls")
  return pathlib.Path(root)


def runtime_library() -> pathlib.Path | None:
  """The oneDNN runtime (`libdnnl.so.3`) that `onednn-cpu-gomp` installed, if any."""
  try:
    files = importlib.metadata.files(RUNTIME_PACKAGE) or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if file.name == "libdnnl.so.3":
      path = pathlib.Path(file.locate()).resolve()
      if path.exists():
        return path
  return None


def _build(runtime: pathlib.Path, rebuild: bool = False) -> pathlib.Path:
  """The compiled handlers: built once per source, jaxlib and runtime, then reused."""
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), importlib.metadata.version("jaxlib").encode(),
               str(runtime).encode()):
    key.update(part)
  out = cache_dir() / f"onednn_conv-{key.hexdigest()[:16]}.so"
  if out.exists() and not rebuild:
    return out
  compiler = os.environ.get("CXX") or "g++"
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler ({compiler!r} not found; set $CXX or install g++)")
  include = jax.ffi.include_dir()
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    built = pathlib.Path(tmp) / out.name
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}",
               str(SOURCE), "-o", str(built), f"-L{runtime.parent}", f"-l:{runtime.name}",
               f"-Wl,-rpath,{runtime.parent}"]
    try:
      done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
      raise RuntimeError(f"compiling {SOURCE.name} took over 600 s") from None
    if done.returncode:
      raise RuntimeError(f"compiling {SOURCE.name} failed: {done.stderr.strip()[-2000:]}")
    os.replace(built, out)  # Atomic: concurrent builders each leave a whole file.
  return out


@functools.cache
def _library() -> ctypes.CDLL | None:
  global _reason
  _reason = None  # A lookup after cache_clear() must not keep an earlier reason.
  if os.environ.get("JAXCLS_ONEDNN", "1") == "0":
    _reason = "turned off by JAXCLS_ONEDNN=0"
    return None
  if not backend.is_cpu():  # Nothing is built or registered for a GPU or TPU host.
    _reason = f"JAX's default backend is {jax.default_backend()}, not the CPU"
    return None
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    _reason = f"built for Linux x86-64 only, not {platform.system()} {platform.machine()}"
    return None
  runtime = runtime_library()
  if runtime is None:
    _reason = f"the oneDNN runtime is not installed (pip install {RUNTIME_PACKAGE})"
    return None
  try:
    try:
      library = ctypes.CDLL(str(_build(runtime)))
    except OSError:  # A cached build that does not load here (e.g. another host's).
      library = ctypes.CDLL(str(_build(runtime, rebuild=True)))
    for target in TARGETS:
      name = TARGET_PREFIX + target
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                  platform="cpu")
    library.jaxcls_onednn_conv_supported.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    library.jaxcls_onednn_conv_supported.restype = ctypes.c_int
  except (OSError, RuntimeError, AttributeError) as error:
    _reason = str(error)
    log.warning("jaxcls: oneDNN convolutions unavailable, XLA's are used: %s", error)
    return None
  return library


def available() -> bool:
  """True when oneDNN's convolutions can be used (built and registered on first call)."""
  return _library() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False; None when it is True."""
  _library()
  return _reason


def geometry(x_shape, w_shape, strides, padding) -> tuple[int, ...] | None:
  """The geometry oneDNN runs (NHWC input, HWIO weights), or None if it cannot.

  `padding` is ((top, bottom), (left, right)). Asks the library, which makes and keeps
  the convolution's primitives (and declines a window larger than the padded input), so
  an unsupported case is found when tracing.
  """
  if not available():
    return None
  dims = (*x_shape, *w_shape, *strides, *padding[0], *padding[1])
  if not all(type(d) is int for d in dims):  # Symbolic (exported) shapes.
    return None
  (n, h, w, c), (kh, kw, ci, o) = x_shape, w_shape
  if ci != c or min(n, h, w, c, kh, kw, o, *strides) <= 0 or min(*padding[0], *padding[1]) < 0:
    return None
  g = (n, h, w, c, o, kh, kw, *strides, *padding[0], *padding[1])
  if not _library().jaxcls_onednn_conv_supported((ctypes.c_int64 * len(g))(*g)):
    return None
  return g


def _out_shape(g):
  n, h, w, _, o, kh, kw, sh, sw, pt, pb, pl, pr = g
  return (n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, o)


def _call(target, shape, a, b, g):
  attrs = dict(zip(("stride_h", "stride_w", "pad_top", "pad_bottom", "pad_left",
                    "pad_right"), (np.int64(v) for v in g[7:])))
  return jax.ffi.ffi_call(TARGET_PREFIX + target,
                          jax.ShapeDtypeStruct(shape, np.float32),
                          vmap_method="sequential")(a, b, **attrs)


# The three convolutions are each other's derivatives: with y = conv(x, w),
# dx = backward_data(dy, w) and dw = backward_weights(x, dy), all bilinear,
# <dx', backward_data(dy, w)> = <conv(dx', w), dy> and
# <dw', backward_weights(x, dy)> = <conv(x, dw'), dy>. Each is a JAX primitive whose
# forward-mode rule is the product rule and whose transposes are the other two, so
# every order of differentiation, forward (jax.jvp) and reverse, stays in oneDNN.


def _primitive(target, out_shape):
  """A bilinear primitive running one of the library's handlers."""
  primitive = jax.extend.core.Primitive(TARGET_PREFIX + target)
  call = lambda a, b, *, geom: _call(target, out_shape(geom), a, b, geom)
  primitive.def_impl(call)
  primitive.def_abstract_eval(
      lambda a, b, *, geom: jax.core.ShapedArray(out_shape(geom), np.float32))
  mlir.register_lowering(primitive, mlir.lower_fun(call, multiple_results=False),
                         platform="cpu")
  batching.primitive_batchers[primitive] = functools.partial(_one_by_one, primitive)
  return primitive


def _one_by_one(primitive, args, dims, *, geom):
  """vmap: the batched operands one slice at a time (the library's shapes are fixed)."""
  mapped = [d is not None for d in dims]  # None: not batched.
  moved = [jnp.moveaxis(a, d, 0) if m else a for a, d, m in zip(args, dims, mapped)]

  def one(slices):
    taken = iter(slices)
    return primitive.bind(*[next(taken) if m else a for a, m in zip(moved, mapped)],
                          geom=geom)

  return lax.map(one, [a for a, m in zip(moved, mapped) if m]), 0


_forward_p = _primitive("forward", _out_shape)
_backward_data_p = _primitive("backward_data", lambda g: g[:4])
_backward_weights_p = _primitive("backward_weights", lambda g: (g[5], g[6], g[3], g[4]))
ad.defbilinear(_forward_p,
               lambda dy, x, w, *, geom: backward_data(dy, w, geom),
               lambda dy, x, w, *, geom: backward_weights(x, dy, geom))
ad.defbilinear(_backward_data_p,
               lambda ddx, dy, w, *, geom: conv(ddx, w, geom),
               lambda ddx, dy, w, *, geom: backward_weights(ddx, dy, geom))
ad.defbilinear(_backward_weights_p,
               lambda ddw, x, dy, *, geom: backward_data(dy, ddw, geom),
               lambda ddw, x, dy, *, geom: conv(x, ddw, geom))


def conv(x, w, g):
  """y = conv(x, w) for NHWC `x`, HWIO `w` and a `geometry(...)` `g`."""
  return _forward_p.bind(x, w, geom=g)


def backward_data(dy, w, g):
  """The input gradient of `conv` for the output gradient `dy`."""
  return _backward_data_p.bind(dy, w, geom=g)


def backward_weights(x, dy, g):
  """The weight gradient of `conv` at input `x` for the output gradient `dy`."""
  return _backward_weights_p.bind(x, dy, geom=g)
