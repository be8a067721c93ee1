"""Huge-page allocation for jaxcls's training and benchmark programs, set at process start.

glibc's allocator hands each large buffer back to the kernel when it is freed, so a
train step that allocates its activations afresh pays a page fault for every 4 KiB it
touches, every step: about 74,000 faults and 0.13 CPU-seconds of kernel time per
ResNet-18 step (128 px, batch 32) on a 2-core machine. With glibc's tunable
`glibc.malloc.hugetlb=1` the allocator asks for transparent huge pages (2 MiB) instead;
faults drop to about 700 per step, and the step takes 0.85 of its time for ResNet-18 (394
against 466 ms) and 0.91 for the catdog CNN (benchmarks/README.md).

glibc reads its tunables once, when the process starts, so the training and benchmark
programs (`run_train.py`, `jaxcls-train`, `jaxcls-benchmark`) call
`reexec_with_tuned_allocator()` first (through `jaxcls.cpu.process.configure_process`):
when the tunable would help and is not set, it
re-executes the same command with it added to `GLIBC_TUNABLES`. Importing jaxcls as a
library never does this. It is skipped when any of these holds:

- `JAXCLS_ALLOCATOR_DEFAULTS=0` is in the environment;
- not Linux, or glibc older than 2.35 (the first with the tunable);
- transparent huge pages are not in `madvise` mode (`always` already uses them, `never`
  forbids them, as does a process-wide `prctl(PR_SET_THP_DISABLE)`);
- the program was read from standard input, or the session is interactive;
- `GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb`, or `LD_PRELOAD` loads another
  allocator (tcmalloc, jemalloc, mimalloc);
- the process was already re-executed once;
- JAX will not run on the CPU (`jaxcls.cpu.backend.will_be_cpu`: a GPU or TPU host).
"""

from __future__ import annotations

import os
import sys

from jaxcls.cpu import backend

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MARKER = "JAXCLS_ALLOCATOR_REEXEC"
_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library when it is glibc, else None."""
  try:
    name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):
    return None


def thp_mode(path: str = THP_MODE_FILE, status: str = "/proc/self/status") -> str | None:
  """The bracketed transparent-huge-page mode: 'always', 'madvise', 'never' or None.

  'never' too when this process has them switched off (`prctl(PR_SET_THP_DISABLE)`, which
  some sandboxes apply; `THP_enabled: 0` in `/proc/self/status`).
  """
  try:
    with open(path, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return None
  try:
    with open(status, encoding="ascii", errors="replace") as f:
      if any(line.split() == ["THP_enabled:", "0"] for line in f):
        return "never"
  except OSError:
    pass
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def _can_reexecute(argv) -> bool:
  """False for an interactive session or a program read from standard input: a second
  process would find the program gone (stdin already read) or replace the session."""
  return bool(argv) and not hasattr(sys, "ps1") and not sys.flags.interactive and (
      sys.argv[0] not in ("", "-"))


def tuned_environment(environ, *, platform: str, libc: tuple[int, int] | None,
                      thp: str | None) -> dict | None:
  """The environment to re-execute with, or None when nothing should change."""
  if environ.get("JAXCLS_ALLOCATOR_DEFAULTS", "1") == "0" or environ.get(_MARKER):
    return None
  if not platform.startswith("linux") or libc is None or libc < (2, 35) or thp != "madvise":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  preload = environ.get("LD_PRELOAD", "")
  if TUNABLE in tunables or any(name in preload for name in _OTHER_ALLOCATORS):
    return None
  return {**environ, _MARKER: "1",
          "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def tuned_environment_here(environ=os.environ) -> dict | None:
  """`tuned_environment` for this machine and process; None off the CPU backend."""
  if not backend.will_be_cpu(environ):
    return None
  return tuned_environment(environ, platform=sys.platform, libc=glibc_version(),
                           thp=thp_mode())


def reexec_with_tuned_allocator() -> None:
  """Re-executes this command with huge-page allocation when that helps; see above.

  Call it first thing in a `__main__` block, before JAX is imported. It does not return
  when it re-executes (the process id, arguments and open terminal stay the same).
  """
  environ = tuned_environment_here()
  argv = getattr(sys, "orig_argv", None)
  if environ is None or not _can_reexecute(argv):
    return
  for stream in (sys.stdout, sys.stderr):
    if stream is not None:  # None when the file descriptor was closed.
      stream.flush()
  try:
    os.execve(sys.executable, argv, environ)
  except OSError:
    return  # Could not re-execute (e.g. the interpreter moved): run as we are.
