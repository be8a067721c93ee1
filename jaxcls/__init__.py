"""jaxcls: train image classifiers with JAX/Flax and serve their predictions."""

from jaxcls import _xla_defaults

_xla_defaults.apply()

__version__ = "0.1.0"
