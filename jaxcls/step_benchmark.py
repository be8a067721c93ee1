"""Moved: `python -m jaxcls.benchmark step` (`jaxcls/benchmark/step.py`). This module keeps
`python -m jaxcls.step_benchmark` working until jaxcls 0.3."""

if __name__ == "__main__":
  import sys
  from jaxcls.cli.benchmark import main
  sys.exit(main(["step", *sys.argv[1:]]))
