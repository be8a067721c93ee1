"""Export a trained model as one self-contained file that needs only JAX to run.

`jaxcls-export --workdir DIR --out model.jaxexport` (`jaxcls/cli/export.py`) writes two
files:
- `model.jaxexport`: the model serialized with `jax.export` (StableHLO, weights baked in
  as constants). Input: uint8 [N, S, S, 3] RGB pixels after jaxcls's preprocessing, with
  N symbolic (any batch size); output: float32 softmax probabilities [N, C].
- `model.jaxexport.json`: class names, image size, the preprocessing to apply before the
  model, and where the weights came from.

`examples/predict_exported.py` loads and runs it with jax, numpy and Pillow only (no
jaxcls, flax or optax). The exported function is the same
`jaxcls.serve.predictor.probabilities` that the Predictor jits, so both give the same
numbers.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls.serve import predictor as predict_lib

FORMAT = "jaxcls-export"
FORMAT_VERSION = 1
DEFAULT_PLATFORMS = ("cpu", "cuda")  # Also jaxcls-export's default.
METADATA_SUFFIX = ".json"

PREPROCESSING = {
    "decode": "Pillow; JPEGs decoded in draft mode at the smallest 1/2, 1/4 or 1/8 scale "
              "that keeps both sides >= image_size; EXIF orientation applied",
    "to_rgb": "palette and alpha modes composited over white; 16-bit and 32-bit "
              "grayscale scaled to 0..255 (by 255/65535 if any value exceeds 255); "
              "other modes converted by Pillow",
    "resize": "PIL.ImageOps.fit(image, (image_size, image_size), BILINEAR): shorter "
              "side to image_size, centre crop",
    "normalization": "inside the model: (pixels - input_mean) / input_std",
}


def export_predictor(predictor: predict_lib.Predictor, *, tta: bool = False,
                     platforms: Sequence[str] | None = DEFAULT_PLATFORMS
                     ) -> jax.export.Exported:
  """The predictor's model as an `Exported`: uint8 [N, S, S, 3] → probabilities [N, C].

  The weights are closed over, so they become constants of the serialized module.
  """
  variables, model = predictor.variables, predictor.model

  def probabilities(images):
    # The plain model: no process-local kernel (jaxcls.cpu) may end up in the file.
    return predict_lib.probabilities(variables, images, model=model, tta=tta,
                                     apply=model.apply)

  batch, = jax.export.symbolic_shape("batch")
  size = predictor.image_size
  spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  return jax.export.export(jax.jit(probabilities), platforms=platforms)(spec)


def model_description(predictor: predict_lib.Predictor, *, workdir: str,
                      tta: bool) -> dict:
  """What a reader of any exported file needs: classes, input, preprocessing, source.
  Shared by this format's JSON file and the ONNX file's metadata (onnx_export.py)."""
  model = predictor.model
  return {
      "class_names": list(predictor.class_names),
      "image_size": predictor.image_size,
      "input": {"dtype": "uint8", "shape": ["N", predictor.image_size,
                                            predictor.image_size, 3],
                "channels": "RGB", "range": [0, 255]},
      "preprocessing": {**PREPROCESSING, "input_mean": list(model.mean),
                        "input_std": list(model.std)},
      "tta": tta,
      "source": {"workdir": os.path.abspath(workdir), "step": predictor.step,
                 "checkpoint": predictor.checkpoint_description},
  }


def metadata(predictor: predict_lib.Predictor, exported: jax.export.Exported, *,
             workdir: str, tta: bool) -> dict:
  """What a program needs besides the model: classes, input size, preprocessing."""
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      **model_description(predictor, workdir=workdir, tta=tta),
      "output": {"dtype": "float32", "shape": ["N", len(predictor.class_names)],
                 "meaning": "softmax probabilities, in class_names order"},
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
  }


def write(exported: jax.export.Exported, meta: dict, out: str) -> tuple[str, str]:
  """Writes the model and its metadata (OUT and OUT.json); returns both paths."""
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  with open(out, "wb") as f:
    f.write(exported.serialize())
  meta_path = out + METADATA_SUFFIX
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  return out, meta_path


def load(path: str) -> tuple[jax.export.Exported, dict]:
  """Reads a model written by `write` and its metadata."""
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with open(path + METADATA_SUFFIX) as f:
    return exported, json.load(f)


def check(predictor: predict_lib.Predictor, exported: jax.export.Exported, *,
          tta: bool, count: int = 3) -> float:
  """Largest difference between the export's and the Predictor's probabilities.

  Runs both on `count` random images after a serialize/deserialize round trip, so a
  broken file is caught when it is written, not when it is deployed.
  """
  size = predictor.image_size
  images = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), np.uint8)
  reloaded = jax.export.deserialize(exported.serialize())
  exported_probs = np.asarray(reloaded.call(images))
  expected, _ = predictor.predict_arrays(images, tta=tta)
  return float(np.max(np.abs(exported_probs - expected)))


def runs_here(platforms: Sequence[str]) -> bool:
  backend = jax.default_backend()  # "cpu", "gpu" or "tpu".
  if backend == "gpu":
    return bool({"cuda", "rocm"} & set(platforms))
  return backend in platforms
