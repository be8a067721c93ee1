"""Moved: the library is `jaxcls.serve` (`from jaxcls.serve import Predictor`), the program
`jaxcls-predict` (`jaxcls/cli/predict.py`). This module keeps `python -m jaxcls.predict`
and `from jaxcls.predict import Predictor` working until jaxcls 0.3."""

from jaxcls.serve.predictor import (DEFAULT_TOP_K, Prediction, Predictor,  # noqa: F401
                                  predict, probabilities)

if __name__ == "__main__":
  from jaxcls.cli.predict import cli
  cli()
