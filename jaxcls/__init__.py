"""jaxcls: train image classifiers with JAX/Flax and serve their predictions."""

__version__ = "0.1.0"
