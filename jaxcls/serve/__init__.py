"""Putting a trained model to work: `predict` (jitted softmax + argmax), the `Predictor`,
`export` (a `jax.export` file that needs only JAX), `onnx_export` (an ONNX file for
ONNX Runtime; imported on its own, as it needs the onnx extra) and `server` (an HTTP
server; imported on its own too, as it needs the serve extra: FastAPI, uvicorn)."""

from jaxcls.serve.predictor import DEFAULT_TOP_K, Prediction, Predictor, predict, probabilities

__all__ = ["DEFAULT_TOP_K", "Prediction", "Predictor", "predict", "probabilities"]
