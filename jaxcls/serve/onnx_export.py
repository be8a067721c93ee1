"""Export a trained model as an ONNX file, checked with ONNX Runtime.

`jaxcls-export --workdir DIR --format onnx --out model.onnx` (`jaxcls/cli/export.py`)
writes one file:
- input `images`: uint8 [N, S, S, 3] RGB pixels after jaxcls's preprocessing, N any
  batch size (the symbolic dimension "N");
- outputs `probabilities`: float32 [N, C] softmax probabilities, in class order, and
  `labels`: int32 [N], their argmax (the first of equal values, as jnp.argmax);
- `metadata_props`: the keys of the jax.export format's JSON file (class_names,
  image_size, input, preprocessing with input_mean and input_std, tta, source), plus
  format, format_version and outputs; every value is JSON text.

The graph is `jaxcls.serve.predictor.probabilities`, the function the Predictor jits,
traced with the plain `model.apply` (no jaxcls.cpu kernels) and written operator by
operator (`jaxcls/serve/jaxpr_to_onnx.py`). `examples/predict_onnx.py` runs the file with
onnxruntime, numpy and Pillow only.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime

from jaxcls.errors import JaxclsError
from jaxcls.serve import export as export_lib
from jaxcls.serve import jaxpr_to_onnx
from jaxcls.serve import predictor as predict_lib

FORMAT = "jaxcls-onnx"
FORMAT_VERSION = 1
INPUT = "images"
OUTPUTS = ("probabilities", "labels")
BATCH_DIM = "N"


class OnnxFileError(JaxclsError, ValueError):
  """A file that is not an ONNX model written by jaxcls."""


def export_predictor(predictor: predict_lib.Predictor, *,
                     tta: bool = False) -> onnx.ModelProto:
  """The predictor's model as ONNX: uint8 [N, S, S, 3] → (probabilities, labels)."""
  model = predictor.model
  if jnp.dtype(model.dtype) != jnp.float32:
    raise jaxpr_to_onnx.OnnxExportError(
        f"the model computes in {jnp.dtype(model.dtype).name}, and ONNX's Conv has no "
        "bfloat16 version; export it with --format jax, or export a model trained with "
        "model.dtype=float32.")

  def probabilities_and_labels(variables, images):
    # The plain model: no process-local kernel (jaxcls.cpu) may end up in the file.
    probs = predict_lib.probabilities(variables, images, model=model, tta=tta,
                                      apply=model.apply)
    return probs, jnp.argmax(probs, axis=-1)

  batch, = jax.export.symbolic_shape("batch")
  size = predictor.image_size
  example = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  return jaxpr_to_onnx.convert(probabilities_and_labels, predictor.variables, example,
                               input_name=INPUT, output_names=OUTPUTS,
                               dim_names={"batch": BATCH_DIM}, graph_name="jaxcls")


def metadata(predictor: predict_lib.Predictor, *, workdir: str, tta: bool) -> dict:
  classes = len(predictor.class_names)
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      **export_lib.model_description(predictor, workdir=workdir, tta=tta),
      "outputs": {
          "probabilities": {"dtype": "float32", "shape": [BATCH_DIM, classes],
                            "meaning": "softmax probabilities, in class_names order"},
          "labels": {"dtype": "int32", "shape": [BATCH_DIM],
                     "meaning": "index of the most probable class in class_names"}},
      "jax_version": jax.__version__,
      "onnx_opset": jaxpr_to_onnx.OPSET,
  }


def attach_metadata(model: onnx.ModelProto, meta: dict) -> None:
  """Stores `meta` in the model's metadata_props, each value as JSON text."""
  onnx.helper.set_model_props(model, {key: json.dumps(value)
                                      for key, value in meta.items()})


def read_metadata(model: onnx.ModelProto) -> dict:
  return {prop.key: json.loads(prop.value) for prop in model.metadata_props}


def write(model: onnx.ModelProto, out: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  onnx.save_model(model, out)
  return out


def load(path: str) -> tuple[onnx.ModelProto, dict]:
  """A model written by `write` and its metadata."""
  try:
    model = onnx.load_model(path)
  except OSError as e:
    raise OnnxFileError(f"cannot read '{path}' ({e.strerror or e}).") from None
  except Exception as e:  # noqa: BLE001 - protobuf's errors have no common base.
    raise OnnxFileError(f"'{path}' is not an ONNX model ({type(e).__name__}: {e}); "
                        "write one with jaxcls-export --format onnx.") from None
  meta = read_metadata(model)
  if meta.get("format") != FORMAT:
    raise OnnxFileError(f"'{path}' was not written by jaxcls-export --format onnx "
                        "(its metadata has no format 'jaxcls-onnx').")
  return model, meta


def session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
  """An ONNX Runtime session on the CPU, with its default (full) graph optimizations."""
  state = onnxruntime.capi.onnxruntime_pybind11_state
  try:
    return onnxruntime.InferenceSession(model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])
  except (state.Fail, state.InvalidGraph, state.NotImplemented) as e:
    raise jaxpr_to_onnx.OnnxExportError(
        f"ONNX Runtime {onnxruntime.__version__} cannot run the model: {e}") from None


def run(sess: onnxruntime.InferenceSession,
        images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(probabilities [N, C], labels [N]) for preprocessed uint8 images [N, S, S, 3]."""
  probs, labels = sess.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(images, np.uint8)})
  return probs, labels


def check(predictor: predict_lib.Predictor, model: onnx.ModelProto, *, tta: bool,
          count: int = 3) -> float:
  """Largest difference between ONNX Runtime's and the Predictor's probabilities on
  `count` random images, after a serialize round trip; labels must agree where the
  Predictor's top two probabilities are apart by more than that difference."""
  size = predictor.image_size
  images = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), np.uint8)
  reloaded = onnx.load_model_from_string(model.SerializeToString())
  probs, labels = run(session(reloaded), images)
  expected, expected_labels = predictor.predict_arrays(images, tta=tta)
  difference = float(np.max(np.abs(probs - expected)))
  top2 = np.sort(expected, axis=-1)[:, -2:] if expected.shape[1] > 1 else None
  clear = (top2[:, 1] - top2[:, 0] > 2 * difference) if top2 is not None else True
  if np.any((labels != expected_labels) & clear):
    raise JaxclsError("the ONNX model's labels differ from the Predictor's: "
                      f"{labels.tolist()} against {expected_labels.tolist()}.")
  return difference
