"""Moved: `python -m jaxcls.benchmark predict` (`jaxcls/benchmark/predict.py`). This module
keeps `python -m jaxcls.predict_benchmark` working until jaxcls 0.3."""

if __name__ == "__main__":
  import sys
  from jaxcls.cli.benchmark import main
  sys.exit(main(["predict", *sys.argv[1:]]))
