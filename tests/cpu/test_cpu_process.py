"""The process options jaxcls's programs set before JAX starts (jaxcls.cpu.process): the
allocator setting (when it applies, the re-execution, its effect) and the XLA option."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from jaxcls.cpu import allocator
from jaxcls import platforms
from jaxcls.cpu import xla_flags

LINUX = dict(platform="linux", libc=(2, 36), thp="madvise")


def test_tuned_environment_rules():
  env = allocator.tuned_environment({"PATH": "/bin"}, **LINUX)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == "/bin"
  kept = allocator.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
  assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  for environ, machine in [
      ({"JAXCLS_ALLOCATOR_DEFAULTS": "0"}, LINUX),
      ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX),  # The user's choice stands.
      ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, LINUX),
      (env, LINUX),  # Already re-executed once: never loops.
      ({}, {**LINUX, "thp": "always"}),
      ({}, {**LINUX, "thp": "never"}),
      ({}, {**LINUX, "thp": None}),
      ({}, {**LINUX, "libc": (2, 34)}),
      ({}, {**LINUX, "libc": None}),  # musl and others.
      ({}, {**LINUX, "platform": "darwin"}),
  ]:
    assert allocator.tuned_environment(environ, **machine) is None, (environ, machine)


def test_thp_mode_reads_the_bracketed_choice_and_the_process_switch(tmp_path):
  path, status = tmp_path / "enabled", tmp_path / "status"
  path.write_text("always [madvise] never\n")
  status.write_text("Name:\tpython\nTHP_enabled:\t1\n")
  assert allocator.thp_mode(str(path), str(status)) == "madvise"
  status.write_text("Name:\tpython\nTHP_enabled:\t0\n")  # prctl(PR_SET_THP_DISABLE).
  assert allocator.thp_mode(str(path), str(status)) == "never"
  assert allocator.thp_mode(str(path), str(tmp_path / "no-status")) == "madvise"
  assert allocator.thp_mode(str(tmp_path / "missing"), str(status)) is None


@pytest.mark.slow
def test_a_program_from_standard_input_runs_once_and_in_full():
  program = ("import os\nfrom jaxcls.cpu import allocator\n"
             "allocator.reexec_with_tuned_allocator()\n"
             "print('body', os.environ.get('GLIBC_TUNABLES', ''))\n")
  out = subprocess.run([sys.executable, "-"], input=program, env=_clean_env(),
                       capture_output=True, text=True, check=True).stdout
  assert out.splitlines() == ["body "]  # Not re-executed: stdin is already read.


def _machine_qualifies(environ) -> bool:
  return allocator.tuned_environment_here(environ) is not None


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "JAXCLS_ALLOCATOR_DEFAULTS", "JAXCLS_ALLOCATOR_REEXEC")}
  return {**env, "PYTHONPATH": ROOT, **extra}


@pytest.mark.slow
def test_the_training_command_reexecutes_itself_once_with_the_same_arguments(tmp_path):
  """`jaxcls.cli.train.cli` (run_train.py, jaxcls-train), with training replaced by a
  print."""
  script = tmp_path / "tool.py"
  script.write_text(textwrap.dedent("""\
      import os, sys
      print("start", os.getpid(), flush=True)
      from jaxcls.cli import train
      train._train = lambda argv: print("body", os.getpid(),
                                        os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:])
      train.cli()
      """))
  run = lambda env: subprocess.run([sys.executable, "-u", str(script), "a", "b c"], env=env,
                                   capture_output=True, text=True, check=True).stdout
  out = run(_clean_env()).splitlines()
  starts = [line for line in out if line.startswith("start")]
  body = [line for line in out if line.startswith("body")]
  assert len(body) == 1 and body[0].endswith("['a', 'b c']")
  if _machine_qualifies(_clean_env()):
    assert len(starts) == 2 and starts[0] == starts[1]  # Same process id, run twice.
    assert "glibc.malloc.hugetlb=1" in body[0]
  else:
    assert len(starts) == 1 and "hugetlb" not in body[0]
  off = run(_clean_env(JAXCLS_ALLOCATOR_DEFAULTS="0")).splitlines()
  assert sum(line.startswith("start") for line in off) == 1 and "hugetlb" not in off[-1]


_FAULTS = textwrap.dedent("""\
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # A step's worth of large buffers, allocated and freed.
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)


@pytest.mark.slow
def test_huge_pages_cut_the_page_faults_of_large_buffers():
  """What the setting is for: 64 MiB blocks fault 2 MiB at a time instead of 4 KiB."""
  if not _machine_qualifies(_clean_env()):
    pytest.skip("needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
  faults = {}
  for name, tunables in [("default", None), ("huge", "glibc.malloc.hugetlb=1")]:
    env = _clean_env(**({"GLIBC_TUNABLES": tunables} if tunables else {}))
    faults[name] = int(subprocess.run([sys.executable, "-c", _FAULTS], env=env,
                                      capture_output=True, text=True, check=True).stdout)
  # 10 × 16,384 pages of 4 KiB by default; with huge pages, hundreds per block (5,440 in
  # all here). Loose bound: a host short of free 2 MiB pages falls back to some 4 KiB ones.
  assert faults["default"] > 100_000, faults
  assert faults["huge"] < faults["default"] / 4, faults


def test_xla_option_is_added_only_when_allowed(monkeypatch):
  monkeypatch.setattr(platforms, "backend_started", lambda: False)
  monkeypatch.setattr(platforms, "jaxlib_release", lambda: (0, 10))
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.apply(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                      "--xla_cpu_experimental_ynn_fusion_type=individual_dot"]
  own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
  assert not xla_flags.apply(own) and own["XLA_FLAGS"].endswith("=")
  off = {"JAXCLS_XLA_DEFAULTS": "0"}
  assert not xla_flags.apply(off) and "XLA_FLAGS" not in off
  monkeypatch.setattr(platforms, "jaxlib_release", lambda: (0, 99))
  assert not xla_flags.apply({})  # Not measured on that jaxlib: left alone.


@pytest.mark.slow
def test_programs_set_the_xla_option_before_jax_starts_and_the_library_does_not():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXCLS_XLA_DEFAULTS")}
  code = ("import os, sys, jaxcls.train\n"
          "if sys.argv[1] == 'program':\n"
          "  from jaxcls.cpu.process import configure_process\n"
          "  configure_process()\n"
          "import jax; jax.numpy.ones(1).block_until_ready()\n"
          "print(os.environ.get('XLA_FLAGS', ''))")
  measured = platforms.jaxlib_release() in xla_flags.MEASURED_JAXLIB
  for role, expected in (("library", False), ("program", measured)):
    out = subprocess.run([sys.executable, "-c", code, role], env=env, capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.strip()
    assert ("ynn_fusion_type=individual_dot" in out) == expected, role
