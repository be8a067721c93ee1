"""The one entry point of the benchmarks: `jaxcls-benchmark NAME [ARGS]` (also
`python -m jaxcls.cli.benchmark NAME [ARGS]`). Without NAME, flags go to `loader`, as
before 0.2."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from jaxcls.cli import common


TUNED = ("step", "loader")  # As `run_train.py` runs: jaxcls.cpu.allocator.


def main(argv: Sequence[str] | None = None) -> int:
  from jaxcls.benchmark import COMMANDS  # Light: names only.
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ("-h", "--help"):
    print("usage: jaxcls-benchmark NAME [ARGS]   (NAME --help for its flags)\n"
          f"NAME: {', '.join(COMMANDS)}")
    return 0
  name = argv.pop(0) if argv and not argv[0].startswith("-") else "loader"
  if name not in COMMANDS:
    print(f"error: unknown benchmark '{name}'; choose one of {', '.join(COMMANDS)}.",
          file=sys.stderr)
    return 2
  # Before JAX; may re-execute. The train-step benchmarks run as training does (huge
  # pages); the others, PyTorch's side of the comparison among them, as they are.
  common.configure_process(tune_allocator=name in TUNED)
  benchmark = importlib.import_module(COMMANDS[name])
  return common.run(lambda: benchmark.main(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
