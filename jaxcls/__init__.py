"""jaxcls: train image classifiers with JAX/Flax and serve their predictions.

Importing jaxcls sets no process option (no environment variable, no XLA flag); the
command-line programs do that (`jaxcls.cpu.process`).

    from jaxcls import train_and_evaluate, Predictor   # loaded on first use
"""

import importlib

__version__ = "0.3.0"

_EXPORTS = {"train_and_evaluate": "jaxcls.train", "Predictor": "jaxcls.serve.predictor"}


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'jaxcls' has no attribute {name!r}")
