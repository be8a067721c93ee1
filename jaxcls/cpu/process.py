"""Process options for jaxcls's command-line programs, set before JAX starts.

Imports nothing heavy (no JAX), so a program can call `configure_process()` first thing
and a re-execution costs little.
"""

from __future__ import annotations

from jaxcls.cpu import allocator, xla_flags


def configure_process(*, tune_allocator: bool = False) -> None:
  """A command-line program's first call, before JAX starts its backend.

  Adds jaxcls's XLA:CPU option to XLA_FLAGS; with `tune_allocator` (training and
  benchmarks), re-executes the command with huge-page allocation where that helps (it
  does not return then). Both only when JAX will run on the CPU
  (`jaxcls.cpu.backend.will_be_cpu`): on a GPU or TPU host it does nothing.
  """
  xla_flags.apply()
  if tune_allocator:
    allocator.reexec_with_tuned_allocator()
