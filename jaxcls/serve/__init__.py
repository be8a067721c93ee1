"""Putting a trained model to work: `predict` (jitted softmax + argmax), the `Predictor`,
and `export` (a `jax.export` file that needs only JAX)."""

from jaxcls.serve.predictor import DEFAULT_TOP_K, Prediction, Predictor, predict, probabilities

__all__ = ["DEFAULT_TOP_K", "Prediction", "Predictor", "predict", "probabilities"]
