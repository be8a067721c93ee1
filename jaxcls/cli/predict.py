"""Classify image files with a trained model.

    jaxcls-predict --workdir DIR PATH [PATH ...] [--top-k K] [--tta] [--batch-size N]
        [--output FILE.csv|FILE.jsonl] [--json]

PATH is a file, a folder (searched recursively for images) or a glob ("photos/**/*.jpg").
Every input gets exactly one result line or one error line, in input order; the exit
status is 1 if any input failed, 2 if nothing could run (bad flags, no checkpoint).
Compiled programs are kept in JAX's persistent compilation cache, so a second run skips
XLA compilation.
"""

from __future__ import annotations

import collections
import csv
import glob
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Sequence

from jaxcls.cli import common
from jaxcls.data.sources.base import IMAGE_EXTENSIONS, is_image_name

if TYPE_CHECKING:  # Imported when predicting: jax loads only after the flags are read.
  from jaxcls.serve.predictor import Prediction

MANY_FILES = 100  # A progress bar is shown from this many inputs on.
OUTPUT_FORMATS = (".csv", ".jsonl")


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
                          f"{', '.join(sorted(IMAGE_EXTENSIONS))})"))
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
              if is_image_name(f) and not f.startswith(".")]
  return sorted(found)


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given; folders and globs replaced by the image files they name, sorted."""
  return [path for path, error in expand_inputs(paths) if error is None]


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


def build_parser() -> common.Parser:
  parser = common.Parser(
      prog="jaxcls-predict",
      description="Classify image files with a model trained by jaxcls. Every input gets "
                  "one result line or one error line, in order; exit status 1 if any "
                  "input failed.")
  parser.add_argument("--workdir", required=True, help="The training run's workdir.")
  parser.add_argument("paths", nargs="+", metavar="PATH",
                      help="Image files, folders (searched recursively) or globs.")
  parser.add_argument("--top-k", type=common.positive_int, default=None,
                      help="Show the K most probable classes (default 1, as the Python "
                           "API's).")
  parser.add_argument("--tta", action="store_true",
                      help="Average the probabilities of each image and its mirror image.")
  parser.add_argument("--batch-size", type=common.positive_int, default=64,
                      help="Images per model call (default 64).")
  parser.add_argument("--output", default=None, metavar="FILE.csv|FILE.jsonl",
                      help="Write results to this file instead of stdout.")
  parser.add_argument("--json", action="store_true",
                      help="Print one JSON object per line instead of tab-separated text.")
  parser.add_argument("--step", type=int, default=None,
                      help="Checkpoint step to use (default: the best by val accuracy).")
  common.add_weights_flag(parser)
  parser.add_argument("--workers", type=int, default=0,
                      help="Decode threads (default 0: one per CPU core).")
  parser.add_argument("--no-progress", action="store_true",
                      help="Never show a progress bar.")
  common.add_cache_flags(parser)
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


def _predict(argv) -> int:
  args, _ = common.parse(build_parser(), argv)
  if args.output is not None and not args.output.endswith(OUTPUT_FORMATS):
    raise common.UsageError(f"--output '{args.output}' must end in .csv or .jsonl.")
  common.enable_compilation_cache(args.compilation_cache, args.no_compilation_cache)
  out = None
  if args.output is not None:  # Before loading the model: fail fast.
    try:
      out = open(args.output, "w", newline="", encoding="utf-8")
    except OSError as e:
      raise common.UsageError(
          f"cannot write --output '{args.output}' ({e.strerror or e}).") from None
  from jaxcls.serve import DEFAULT_TOP_K, Predictor
  try:
    predictor = Predictor.from_workdir(args.workdir, step=args.step, weights=args.weights,
                                       batch_size=args.batch_size, workers=args.workers,
                                       tta=args.tta)
  except BaseException:
    if out is not None:  # Leave no empty output file behind.
      out.close()
      os.remove(args.output)
    raise
  print(f"Loaded {predictor.checkpoint_description} from {args.workdir}", file=sys.stderr)
  args.top_k = args.top_k or DEFAULT_TOP_K
  return _predict_all(predictor, args, out)


def _predict_all(predictor, args, out) -> int:
  from tqdm.auto import tqdm
  from jaxcls.serve import Prediction
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


def main(argv: Sequence[str] | None = None) -> int:
  common.configure_process()
  return common.run(lambda: _predict(argv))


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
