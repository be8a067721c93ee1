"""Predictions from a trained workdir: a jitted `predict`, the `Predictor`, and a CLI.

    python -m jaxcls.predict --workdir DIR PATH [PATH ...] [--top-k K] [--tta]
        [--batch-size N] [--output FILE.csv|FILE.jsonl] [--json]

PATH is a file, a folder (searched recursively for images) or a glob ("photos/**/*.jpg").
Every input gets exactly one result line or one error line, in input order; the exit
status is 1 if any input failed, 2 if nothing could run (bad flags, no checkpoint).

Files go through `jaxcls.data.preprocess.load_image`, the function training and
evaluation use, and the model normalizes its input itself, so predict sees pixels exactly
as training did. Decoding runs in a thread pool ahead of the model, and compiled
programs are kept in JAX's persistent compilation cache, so a second run of the CLI
skips XLA compilation.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import dataclasses
import functools
import glob
import json
import logging
import os
import sys
import time
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import checkpoint
from jaxcls import config as config_lib
from jaxcls.data import preprocess, sources
from jaxcls.models import create_model

DEFAULT_TOP_K = 5  # Python API default, capped at the number of classes.
MANY_FILES = 100  # The CLI shows a progress bar from this many inputs on.
CACHE_ENV = "JAXCLS_COMPILATION_CACHE"  # A folder, or "off".
OUTPUT_FORMATS = (".csv", ".jsonl")


def probabilities(variables: dict, images: jnp.ndarray, *, model,
                  tta: bool = False) -> jnp.ndarray:
  """Softmax probabilities [N, C] for images [N, S, S, 3] (uint8, or float in [0, 255]).

  With `tta`, the average of the probabilities of each image and its horizontal mirror.
  Not jitted itself: `predict` and `jaxcls.export` both trace this one function, so an
  exported model computes exactly what the Predictor computes.
  """
  if tta:
    # One batch of 2N: batch norm in inference mode treats every image on its own.
    both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    probs = jax.nn.softmax(model.apply(variables, both, train=False), axis=-1)
    n = images.shape[0]
    return (probs[:n] + probs[n:]) / 2
  return jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)


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

  `workers` is the number of decode threads (0: one per CPU core); `tta` averages each
  image's probabilities with its horizontal mirror's.
  """

  def __init__(self, model, variables: dict, class_names: Sequence[str], image_size: int,
               *, step: int | None = None, batch_size: int = 64, workers: int = 0,
               tta: bool = False):
    self.model = model
    self.variables = variables
    self.class_names = tuple(class_names)
    self.image_size = image_size
    self.step = step
    self.batch_size = batch_size
    self.workers = workers
    self.tta = tta

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

    `top_k` most probable classes go in each Prediction's `top_k` (default 5, at most
    the number of classes).
    """
    return list(self.iter_predict_files(paths, top_k))

  def predict_images(self, images: Iterable, top_k: int | None = None) -> list[Prediction]:
    """Like predict_files, for PIL images, encoded bytes or [H, W(, 1|3|4)] arrays."""
    images = list(images)
    return list(self._iter(images, [None] * len(images), top_k))


def expand_inputs(paths: Sequence[str]) -> list[tuple[str, str | None]]:
  """(path, error) pairs in order: files as given, folders and globs expanded.

  A folder becomes the image files below it (recursively, sorted, hidden files skipped);
  a glob ("**" recurses) becomes its sorted matches. A folder without images or a glob
  without matches is one entry with an error, so that every argument is accounted for.
  """
  out: list[tuple[str, str | None]] = []
  for path in paths:
    if os.path.isdir(path):
      found = _images_below(path)
      out.extend((p, None) for p in found)
      if not found:
        out.append((path, "folder holds no image files (extensions: "
                          f"{', '.join(sorted(sources.IMAGE_EXTENSIONS))})"))
    elif not os.path.exists(path) and glob.has_magic(path):
      matches = sorted(glob.glob(os.path.expanduser(path), recursive=True))
      files = []
      for match in matches:
        files.extend(_images_below(match) if os.path.isdir(match) else [match])
      out.extend((p, None) for p in files)
      if not files:
        out.append((path, "no file matches this pattern"))
    else:
      out.append((path, None))
  return out


def _images_below(folder: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    found += [os.path.join(dirpath, f) for f in filenames
              if sources.is_image_name(f) and not f.startswith(".")]
  return sorted(found)


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given; folders and globs replaced by the image files they name, sorted."""
  return [path for path, error in expand_inputs(paths) if error is None]


def default_cache_dir() -> str:
  """Where the CLI keeps compiled programs: $XDG_CACHE_HOME/jaxcls/jax_cache."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxcls", "jax_cache")


def resolve_cache_dir(flag: str | None = None, disabled: bool = False) -> str | None:
  """The cache folder to use: the flag, else $JAXCLS_COMPILATION_CACHE, else the default.

  None means no cache: --no-compilation-cache, or the variable set to "off" (or "0").
  """
  if disabled:
    return None
  if flag:
    return os.path.expanduser(flag)
  env = os.environ.get(CACHE_ENV)
  if env is not None:
    off = env.strip().lower() in ("", "0", "off", "false", "no", "none")
    return None if off else os.path.expanduser(env)
  return default_cache_dir()


def enable_compilation_cache(path: str, hint: str = "Pass --compilation-cache DIR or set "
                             "JAXCLS_COMPILATION_CACHE=off.") -> str | None:
  """Points JAX's persistent compilation cache at `path`; returns it, or None if unusable.

  Must run before the first compilation. Small models compile in well under JAX's
  default one-second threshold for caching, so every program is cached.
  """
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
      raise PermissionError(f"'{path}' is not writable")
  except OSError as e:
    print(f"warning: compilation cache disabled: cannot use '{path}' ({e}). {hint}",
          file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


class _TextWriter:
  """Tab-separated lines on stdout: path, then label and probability (top-k pairs)."""

  def __init__(self, out, bar):
    self.out, self.bar = out, bar

  def write(self, result: Prediction) -> None:
    if result.ok:
      pairs = result.top_k or [(result.label, result.probability)]
      line = "\t".join([result.path] + [f"{name}\t{p:.4f}" for name, p in pairs])
    else:
      line = f"{result.path}\terror: {result.error}"
    if self.bar is not None and not self.bar.disable:
      self.bar.write(line, file=self.out)
    else:
      print(line, file=self.out)

  def close(self) -> None:
    self.out.flush()


class _JsonWriter:
  """One JSON object per line (the --json format and .jsonl output files)."""

  def __init__(self, out, close_out: bool):
    self.out, self.close_out = out, close_out

  def write(self, result: Prediction) -> None:
    self.out.write(json.dumps(result.to_json()) + "\n")

  def close(self) -> None:
    self.out.close() if self.close_out else self.out.flush()


class _CsvWriter:
  """path, label, probability, top2..topK label/probability, one column per class, error."""

  def __init__(self, out, class_names: Sequence[str], top_k: int):
    self.out, self.class_names, self.top_k = out, class_names, top_k
    self.csv = csv.writer(out)
    header = ["path", "label", "probability"]
    for i in range(2, top_k + 1):
      header += [f"top{i}_label", f"top{i}_probability"]
    self.csv.writerow(header + [f"prob_{c}" for c in class_names] + ["error"])

  def write(self, result: Prediction) -> None:
    width = 1 + 2 * self.top_k + len(self.class_names)
    if not result.ok:
      self.csv.writerow([result.path] + [""] * (width - 1) + [result.error])
      return
    row = [result.path, result.label, result.probability]
    for name, p in (result.top_k or [])[1:self.top_k]:
      row += [name, p]
    row += [""] * (1 + 2 * self.top_k - len(row))
    row += [result.probabilities[c] for c in self.class_names]
    self.csv.writerow(row + [""])

  def close(self) -> None:
    self.out.close()


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number")
  return value


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m jaxcls.predict",
      description="Classify image files with a model trained by jaxcls. Every input gets "
                  "one result line or one error line, in order; exit status 1 if any "
                  "input failed.")
  parser.add_argument("--workdir", required=True, help="The training run's workdir.")
  parser.add_argument("paths", nargs="+", metavar="PATH",
                      help="Image files, folders (searched recursively) or globs.")
  parser.add_argument("--top-k", type=_positive_int, default=1,
                      help="Show the K most probable classes (default 1).")
  parser.add_argument("--tta", action="store_true",
                      help="Average the probabilities of each image and its mirror image.")
  parser.add_argument("--batch-size", type=_positive_int, default=64,
                      help="Images per model call (default 64).")
  parser.add_argument("--output", default=None, metavar="FILE.csv|FILE.jsonl",
                      help="Write results to this file instead of stdout.")
  parser.add_argument("--json", action="store_true",
                      help="Print one JSON object per line instead of tab-separated text.")
  parser.add_argument("--step", type=int, default=None,
                      help="Checkpoint step to use (default: the best by val accuracy).")
  parser.add_argument("--workers", type=int, default=0,
                      help="Decode threads (default 0: one per CPU core).")
  parser.add_argument("--no-progress", action="store_true",
                      help="Never show a progress bar.")
  parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                      help="JAX persistent compilation cache folder (default: "
                           f"${CACHE_ENV}, else ~/.cache/jaxcls/jax_cache).")
  parser.add_argument("--no-compilation-cache", action="store_true",
                      help="Compile from scratch and keep nothing.")
  return parser


def _make_writer(args, out, class_names: Sequence[str], bar):
  if out is None:
    return _JsonWriter(sys.stdout, False) if args.json else _TextWriter(sys.stdout, bar)
  if args.output.endswith(".csv"):
    return _CsvWriter(out, class_names, min(args.top_k, len(class_names)))
  return _JsonWriter(out, True)


def _summary(total: int, failed: int, counts: collections.Counter,
             class_names: Sequence[str], seconds: float) -> str:
  predicted = total - failed
  rate = f" ({predicted / seconds:.1f} images/s)" if predicted and seconds > 0 else ""
  per_class = ", ".join(f"{name} {counts[name]}" for name in class_names if counts[name])
  lines = [f"Predicted {predicted} of {total} input(s) in {seconds:.1f} s{rate}; "
           f"{failed} failed."]
  if per_class:
    lines.append(f"Per class: {per_class}.")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.output is not None and not args.output.endswith(OUTPUT_FORMATS):
    print(f"error: --output '{args.output}' must end in .csv or .jsonl.", file=sys.stderr)
    return 2
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices.
  cache_dir = resolve_cache_dir(args.compilation_cache, args.no_compilation_cache)
  # A cache folder set through JAX's own JAX_COMPILATION_CACHE_DIR is kept unless the
  # flag names another.
  if cache_dir and (args.compilation_cache or not jax.config.jax_compilation_cache_dir):
    enable_compilation_cache(cache_dir)
  out = None
  if args.output is not None:  # Before loading the model: fail fast.
    try:
      out = open(args.output, "w", newline="", encoding="utf-8")
    except OSError as e:
      print(f"error: cannot write --output '{args.output}' ({e.strerror or e}).",
            file=sys.stderr)
      return 2
  try:
    predictor = Predictor.from_workdir(args.workdir, step=args.step,
                                       batch_size=args.batch_size)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    if out is not None:
      out.close()
      os.remove(args.output)
    return 2
  print(f"Loaded {predictor.checkpoint_description} from {args.workdir}", file=sys.stderr)
  predictor.workers, predictor.tta = args.workers, args.tta
  return _predict_all(predictor, args, out)


def _predict_all(predictor: Predictor, args, out) -> int:
  from tqdm.auto import tqdm  # Imported here: only the CLI draws a progress bar.
  start = time.perf_counter()
  entries = expand_inputs(args.paths)
  bar = tqdm(total=len(entries), unit="img", file=sys.stderr, dynamic_ncols=True,
             disable=args.no_progress or len(entries) < MANY_FILES)
  writer = _make_writer(args, out, predictor.class_names, bar)
  results = predictor.iter_predict_files(
      [path for path, error in entries if error is None], top_k=args.top_k)
  failed, counts = 0, collections.Counter()
  for path, error in entries:
    result = Prediction(path, error=error) if error else next(results)
    failed += not result.ok
    if result.ok:
      counts[result.label] += 1
    writer.write(result)
    bar.update(1)
  bar.close()
  writer.close()
  print(_summary(len(entries), failed, counts, predictor.class_names,
                 time.perf_counter() - start), file=sys.stderr)
  return 1 if failed else 0


def run():
  sys.exit(main())


if __name__ == "__main__":
  run()
