"""Predictions from a trained model: a jitted `predict` and the `Predictor`.

`predict` applies the model, softmax and argmax in one compiled program; the `Predictor`
rebuilds a model from its workdir (`jaxcls.workdir.load_run`), decodes inputs with
`jaxcls.data.preprocess.load_image`, the function training and evaluation use, and
batches them, so predict sees pixels exactly as training did. Decoding runs in a thread
pool ahead of the model.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxcls import steps
from jaxcls import workdir as workdir_lib
from jaxcls.data import preprocess, sources

DEFAULT_TOP_K = 1  # The Python API's and the command line's, capped at the class count.


def probabilities(variables: dict, images: jnp.ndarray, *, model, tta: bool = False,
                  apply=None) -> jnp.ndarray:
  """Softmax probabilities [N, C] for images [N, S, S, 3] (uint8, or float in [0, 255]).

  With `tta`, the average of the probabilities of each image and its horizontal mirror.
  `apply` runs the model: by default `steps.apply_model(model)` (with jaxcls's CPU
  layers on the CPU backend); `jaxcls.serve.export` passes the plain `model.apply`, so a
  file that leaves this process holds XLA's own operations only. Not jitted itself:
  `predict` and the export both trace this one function.
  """
  apply = apply or steps.apply_model(model)
  if tta:
    # One batch of 2N: batch norm in inference mode treats every image on its own.
    both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    probs = jax.nn.softmax(apply(variables, both, train=False), axis=-1)
    n = images.shape[0]
    return (probs[:n] + probs[n:]) / 2
  return jax.nn.softmax(apply(variables, images, train=False), axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "tta"))
def predict(variables: dict, images: jnp.ndarray, *, model,
            tta: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Softmax probabilities [N, C] and argmax labels [N] for images [N, S, S, 3].

  `images` are preprocessed pixels (uint8, or float in [0, 255]); `model` is the flax
  module (static), `variables` its {"params", "batch_stats"}; `tta` as in `probabilities`.
  """
  probs = probabilities(variables, images, model=model, tta=tta)
  return probs, jnp.argmax(probs, axis=-1)


@dataclasses.dataclass
class Prediction:
  """One input's result: either a label with probabilities, or an error."""
  path: str | None
  label: str | None = None
  probability: float | None = None
  probabilities: dict[str, float] | None = None
  error: str | None = None
  top_k: list[tuple[str, float]] | None = None  # Most probable first.

  @property
  def ok(self) -> bool:
    return self.error is None

  def to_json(self) -> dict:
    if self.error is not None:
      return {"path": self.path, "error": self.error}
    row = {"path": self.path, "label": self.label, "probability": self.probability,
           "probabilities": self.probabilities}
    if self.top_k is not None:
      row["top_k"] = [{"label": name, "probability": p} for name, p in self.top_k]
    return row


def _bucket(n: int, batch_size: int) -> int:
  """Smallest power of two >= n, capped at batch_size.

  Padding every call to batch_size would make one image cost a whole batch; padding to
  the exact n would compile once per distinct n. Powers of two compile at most
  log2(batch_size) + 1 shapes (all kept by the persistent compilation cache).
  """
  return min(batch_size, 1 << max(0, n - 1).bit_length())


class Predictor:
  """A trained model ready to classify images; build it with `from_workdir`.

  Options (constructor or `from_workdir` keywords, or attributes later): `batch_size`,
  images per model call; `workers`, decode threads (0: one per CPU core); `tta`, average
  each image's probabilities with its horizontal mirror's.
  """

  def __init__(self, model, variables: dict, class_names: Sequence[str], image_size: int,
               *, step: int | None = None, batch_size: int = 64, workers: int = 0,
               tta: bool = False, description: str = ""):
    if batch_size < 1 or workers < 0:
      raise ValueError(f"batch_size={batch_size}, workers={workers}; use batch_size >= 1 "
                       "and workers >= 0 (0: one per CPU core).")
    self.model = model
    self.variables = variables
    self.class_names = tuple(class_names)
    self.image_size = image_size
    self.step = step
    self.batch_size = batch_size
    self.workers = workers
    self.tta = tta
    self.checkpoint_description = description

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, weights: str = "raw",
                   **options) -> "Predictor":
    """Rebuilds the model and its weights from a checkpoint alone.

    By default the checkpoint with the best validation accuracy (the latest one if none
    was validated yet); `step` picks another. `weights="ema"` uses the weight average of
    a run trained with optim.ema_decay > 0, from the checkpoint where the average was
    best. `checkpoint_description` says which.
    `options` are the constructor's: batch_size, workers, tta.
    """
    run = workdir_lib.load_run(workdir, step, weights)
    return cls(run.model, run.variables, run.class_names, run.config.data.image_size,
               step=run.step, description=run.description, **options)

  def predict_arrays(self, images: np.ndarray,
                     tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [N, C] and labels [N] for preprocessed uint8 [N, S, S, 3] images.

    Runs in chunks of at most `batch_size`, each padded to a power of two, so a single
    image costs one image's compute and any N compiles only a few shapes.
    """
    images = np.asarray(images)
    tta = self.tta if tta is None else tta
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"predict_arrays takes preprocessed images [N, {expected[0]}, "
                       f"{expected[1]}, 3]; got shape {images.shape}. Use predict_images "
                       "for images of any size or mode.")
    probs, labels = [], []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      n = len(chunk)
      pad = np.zeros((_bucket(n, self.batch_size) - n,) + chunk.shape[1:], chunk.dtype)
      padded = np.concatenate([chunk, pad]) if len(pad) else chunk
      p, l = jax.device_get(predict(self.variables, padded, model=self.model, tta=tta))
      probs.append(p[:n])
      labels.append(l[:n])
    if not probs:
      return np.zeros((0, len(self.class_names)), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(probs), np.concatenate(labels)

  def _top_k(self, top_k: int | None) -> int:
    k = min(DEFAULT_TOP_K, len(self.class_names)) if top_k is None else top_k
    if k < 1:
      raise ValueError(f"top_k={top_k}; use a positive number of classes.")
    return min(k, len(self.class_names))

  def _results(self, names: Sequence[str | None], loaded: list,
               top_k: int) -> list[Prediction]:
    good = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
    results = [Prediction(name, error=None if isinstance(item, np.ndarray) else item)
               for name, item in zip(names, loaded)]
    if good:
      probs, labels = self.predict_arrays(np.stack([loaded[i] for i in good]))
      for i, p, l in zip(good, probs, labels):
        results[i].label = self.class_names[int(l)]
        results[i].probability = float(p[l])
        results[i].probabilities = {c: float(v) for c, v in zip(self.class_names, p)}
        order = np.argsort(-p, kind="stable")[:top_k]
        results[i].top_k = [(self.class_names[j], float(p[j])) for j in order]
    return results

  def _load(self, item) -> np.ndarray | str:
    """The model's input for one file or image, or the reason it cannot be read."""
    try:
      return preprocess.load_image(item, self.image_size)
    except preprocess.ImageError as e:
      return e.reason
    except OSError as e:
      return f"cannot read: {e.strerror or e}"
    except Exception as e:  # noqa: BLE001 - one bad input must not stop the others.
      return f"cannot decode: {type(e).__name__}: {e}"

  def _decoded_chunks(self, items: Sequence) -> Iterator[list]:
    """Decoded inputs (or error reasons) in order, `batch_size` at a time.

    Threads decode up to two batches ahead while the model runs on the current one:
    Pillow and XLA release the GIL, so decoding and inference overlap.
    """
    workers = sources.worker_count(self.workers)
    if workers == 1 or len(items) <= 1:
      for start in range(0, len(items), self.batch_size):
        yield [self._load(x) for x in items[start:start + self.batch_size]]
      return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      ahead = 2 * self.batch_size
      pending = collections.deque(pool.submit(self._load, x) for x in items[:ahead])
      chunk, next_index = [], len(pending)
      while pending:
        chunk.append(pending.popleft().result())
        if next_index < len(items):
          pending.append(pool.submit(self._load, items[next_index]))
          next_index += 1
        if len(chunk) == self.batch_size or not pending:
          yield chunk
          chunk = []

  def _iter(self, items: Sequence, names: Sequence[str | None],
            top_k: int | None) -> Iterator[Prediction]:
    k = self._top_k(top_k)
    done = 0
    for loaded in self._decoded_chunks(items):
      yield from self._results(names[done:done + len(loaded)], loaded, k)
      done += len(loaded)

  def iter_predict_files(self, paths: Iterable[str],
                         top_k: int | None = None) -> Iterator[Prediction]:
    """Like predict_files, yielding each batch's results as soon as they are ready."""
    paths = [os.fspath(p) for p in paths]
    return self._iter(paths, paths, top_k)

  def predict_files(self, paths: Iterable[str],
                    top_k: int | None = None) -> list[Prediction]:
    """One Prediction per path, in order; unreadable files get `error` set.

    `top_k` most probable classes go in each Prediction's `top_k` (default 1, at most
    the number of classes).
    """
    return list(self.iter_predict_files(paths, top_k))

  def predict_images(self, images: Sequence, top_k: int | None = None) -> list[Prediction]:
    """Like predict_files, for a sequence of PIL images, encoded bytes or [H, W(, 1|3|4)]
    arrays; a 4-D array [N, H, W, C] is N images. One result per image, in order."""
    _check_image_sequence(images)
    images = list(images)
    return list(self._iter(images, [None] * len(images), top_k))


def _check_image_sequence(images) -> None:
  """A single image passed where a sequence is expected is an error, never a guess:
  iterating over it would classify its rows (an array) or its bytes."""
  single = None
  if isinstance(images, (bytes, bytearray, memoryview)):
    single = "bytes object"
  elif isinstance(images, Image.Image):
    single = "PIL image"
  elif isinstance(images, (str, os.PathLike)):
    single = "path (use predict_files for files)"
  elif isinstance(images, np.ndarray) and images.ndim < 4:
    single = f"array of shape {images.shape}"
  if single is not None:
    raise TypeError(f"predict_images takes a sequence of images and got one {single}. "
                    "Pass [image] to classify one image, or a 4-D array [N, H, W, C] for "
                    "N images.")
