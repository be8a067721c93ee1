"""Predictions from a trained workdir: a jitted `predict`, the `Predictor`, and a CLI.

    python -m jaxcls.predict --workdir DIR PATH [PATH ...] [--json]

Files go through `jaxcls.data.preprocess.load_image`, the function training used, and
the model normalizes its input itself, so predict sees pixels exactly as training did.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import checkpoint
from jaxcls import config as config_lib
from jaxcls.data import preprocess, sources
from jaxcls.models import create_model


@functools.partial(jax.jit, static_argnames=("model",))
def predict(variables: dict, images: jnp.ndarray, *, model) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Softmax probabilities [N, C] and argmax labels [N] for images [N, S, S, 3].

  `images` are preprocessed pixels (uint8, or float in [0, 255]); `model` is the flax
  module (static), `variables` its {"params", "batch_stats"}.
  """
  logits = model.apply(variables, images, train=False)
  probabilities = jax.nn.softmax(logits, axis=-1)
  return probabilities, jnp.argmax(probabilities, axis=-1)


@dataclasses.dataclass
class Prediction:
  """One input's result: either a label with probabilities, or an error."""
  path: str | None
  label: str | None = None
  probability: float | None = None
  probabilities: dict[str, float] | None = None
  error: str | None = None

  @property
  def ok(self) -> bool:
    return self.error is None

  def to_json(self) -> dict:
    if self.error is not None:
      return {"path": self.path, "error": self.error}
    return {"path": self.path, "label": self.label, "probability": self.probability,
            "probabilities": self.probabilities}


class Predictor:
  """A trained model ready to classify images; build it with `from_workdir`."""

  def __init__(self, model, variables: dict, class_names: Sequence[str], image_size: int,
               *, step: int | None = None, batch_size: int = 64):
    self.model = model
    self.variables = variables
    self.class_names = tuple(class_names)
    self.image_size = image_size
    self.step = step
    self.batch_size = batch_size

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   batch_size: int = 64) -> "Predictor":
    """Rebuilds the model and its weights from a checkpoint alone.

    By default the checkpoint with the best validation accuracy (the latest one if none
    was validated yet); `step` picks another. `checkpoint_description` says which.
    """
    from jaxcls.train import create_train_state  # Only the state's structure is used.
    if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
      raise FileNotFoundError(f"No checkpoints in '{workdir}'. Train first: python "
                              "run_train.py --config CONFIG --workdir DIR.")
    mngr = checkpoint.manager(workdir, read_only=True)
    steps = mngr.all_steps()
    if not steps:
      raise FileNotFoundError(f"No finished checkpoint in '{workdir}'.")
    chosen = step
    step = checkpoint.best_step(mngr) if step is None else step
    if step not in steps:
      raise ValueError(f"No checkpoint at step {step} in '{workdir}'; have {steps}.")
    meta = checkpoint.restore_meta(mngr, step)
    config = config_lib.from_dict(meta["config"])
    class_names = meta["class_names"]
    model = create_model(config.model, len(class_names))
    target = jax.eval_shape(
        lambda: create_train_state(config, model, jax.random.key(0), 1))
    state = checkpoint.restore_state(mngr, step, target)
    mngr.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    predictor = cls(model, variables, class_names, config.data.image_size, step=step,
                    batch_size=batch_size)
    which = "requested" if chosen is not None else (
        "best" if meta.get("metrics", {}).get("step") == step else "latest")
    predictor.checkpoint_description = (
        f"the {which} checkpoint: {checkpoint.describe(step, meta)}")
    return predictor

  def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [N, C] and labels [N] for preprocessed uint8 [N, S, S, 3] images.

    Runs in fixed-size batches (the last one padded), so any N compiles once.
    """
    images = np.asarray(images)
    probs, labels = [], []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      padded = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      p, l = jax.device_get(predict(self.variables, padded, model=self.model))
      probs.append(p[:len(chunk)])
      labels.append(l[:len(chunk)])
    if not probs:
      return np.zeros((0, len(self.class_names)), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(probs), np.concatenate(labels)

  def _results(self, names: Sequence[str | None], loaded: list) -> list[Prediction]:
    good = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
    results = [Prediction(name, error=None if isinstance(item, np.ndarray) else item)
               for name, item in zip(names, loaded)]
    if good:
      probs, labels = self.predict_arrays(np.stack([loaded[i] for i in good]))
      for i, p, l in zip(good, probs, labels):
        results[i].label = self.class_names[int(l)]
        results[i].probability = float(p[l])
        results[i].probabilities = {c: float(v) for c, v in zip(self.class_names, p)}
    return results

  def _load(self, item) -> np.ndarray | str:
    try:
      return preprocess.load_image(item, self.image_size)
    except preprocess.ImageError as e:
      return e.reason
    except OSError as e:
      return f"cannot read: {e.strerror or e}"

  def predict_files(self, paths: Iterable[str]) -> list[Prediction]:
    """One Prediction per path, in order; unreadable files get `error` set."""
    paths = [os.fspath(p) for p in paths]
    return self._results(paths, [self._load(p) for p in paths])

  def predict_images(self, images: Iterable) -> list[Prediction]:
    """Like predict_files, for PIL images or arrays ([H, W], [H, W, 1|3|4])."""
    images = list(images)
    return self._results([None] * len(images), [self._load(x) for x in images])


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given; folders replaced by the image files below them, sorted."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = []
      for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in filenames if sources.is_image_name(f)]
      out.extend(sorted(found))
    else:
      out.append(path)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jaxcls.predict",
      description="Classify image files with a model trained by jaxcls.")
  parser.add_argument("--workdir", required=True, help="The training run's workdir.")
  parser.add_argument("paths", nargs="+", help="Image files or folders.")
  parser.add_argument("--json", action="store_true", help="One JSON object per line.")
  parser.add_argument("--step", type=int, default=None,
                      help="Checkpoint step to use (default: the best by val accuracy).")
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices.
  try:
    predictor = Predictor.from_workdir(args.workdir, step=args.step,
                                       batch_size=args.batch_size)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Loaded {predictor.checkpoint_description} from {args.workdir}", file=sys.stderr)
  failed = 0
  for result in predictor.predict_files(expand_paths(args.paths)):
    failed += not result.ok
    if args.json:
      print(json.dumps(result.to_json()))
    elif result.ok:
      print(f"{result.path}\t{result.label}\t{result.probability:.4f}")
    else:
      print(f"{result.path}\terror: {result.error}")
  return 1 if failed else 0


def run():
  sys.exit(main())


if __name__ == "__main__":
  run()
