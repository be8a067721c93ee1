"""What the model learned: curves, confusion matrix, per-class scores, top losses, calibration.

    jaxcls-report --workdir DIR [--step N] [--top-k 24] [--bins 10]

(the program is `jaxcls/cli/report.py`) writes `DIR/report/` (or `--out`) and prints
its path:

- `curves.png`: loss and accuracy per epoch (train vs validation) and the learning rate;
- `time_to_accuracy.png`: validation accuracy against the run's wall time, and the
  first time it reached each of `--targets` (default 0.90, 0.95), also in the JSON;
- `confusion_matrix.png`: counts and row-normalised rates on the validation set;
- `per_class.csv`: precision, recall, F1 and support per class (also printed and in HTML);
- `top_losses.png` and `top_losses/`: the validation images the model is most
  confidently wrong about, with path, true class, predicted class and probability;
- `reliability.png`: the reliability diagram, titled with the expected calibration error;
- `report.json`: every number above, for scripts;
- `index.html`: all of it on one page; images are referenced relatively, so the folder
  reads offline and can be copied elsewhere whole.

The evaluation is training's own: the checkpoint is loaded with `workdir.load_run`, the
validation split is rebuilt from the checkpoint's config with `sources.build_dataset`,
batches come from `loader.eval_batches` (the same preprocessing, padding and masking)
and go through `steps.eval_outputs`, the function whose sums are the validation metrics
in `metrics.jsonl`. Top-loss pictures are read through the source (a file, a zip member,
a TFDS record), so the report works for every kind of source.

`build_report` evaluates the validation split and calls `write_report`, which draws any
`Evaluation`: `jaxcls-evaluate --report DIR` (jaxcls/evaluate.py) draws a held-out set's.
Per-class scores cover the classes that occur among the labels or the predictions.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import html
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxcls import metric_writers, steps
from jaxcls import workdir as workdir_lib
from jaxcls.data import loader, preprocess, sources

REPORT_DIR = "report"
THUMBNAIL_SIZE = 160  # Longest side, in pixels, of a top-losses picture.
ANNOTATE_MAX_CLASSES = 25  # Above this, confusion cells carry no numbers.


@dataclasses.dataclass
class Evaluation:
  """Per-example results on a split, in the split's order."""
  root: str
  paths: tuple[str, ...]  # Relative to root.
  class_names: tuple[str, ...]
  labels: np.ndarray  # int [N]
  logits: np.ndarray  # float32 [N, C]
  losses: np.ndarray  # float32 [N]
  source: Any = dataclasses.field(default=None, repr=False, compare=False)  # For pictures.

  @property
  def probabilities(self) -> np.ndarray:
    shifted = self.logits - self.logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)

  @property
  def predictions(self) -> np.ndarray:
    return np.argmax(self.logits, axis=-1)

  @property
  def accuracy(self) -> float:
    return float(np.mean(self.predictions == self.labels))

  @property
  def loss(self) -> float:
    return float(np.mean(self.losses))


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_outputs(variables: dict, images, labels, *, model):
  # The model is static (hashable, equal when rebuilt): one compile per model and shape.
  return steps.eval_outputs(steps.apply_model(model), variables,
                            {"image": images, "label": labels})


def evaluate_examples(variables: dict, model, source, class_names: Sequence[str], *,
                      batch_size: int, image_size: int, workers: int = 1,
                      progress: bool = True) -> Evaluation:
  """Logits and losses of every example of `source`, computed as evaluation does.

  Batches come from `loader.eval_batches` and go through `steps.eval_outputs`; padding
  rows are dropped. One device and one jit: no collectives are needed per example.
  """
  batches = loader.eval_batches(source, batch_size=batch_size, image_size=image_size,
                                workers=workers)
  logits, losses, labels = [], [], []
  total = -(-len(source) // batch_size)
  for batch in tqdm(batches, total=total, unit="batch", desc="evaluating",
                    disable=not progress, dynamic_ncols=True):
    batch_logits, batch_losses = jax.device_get(
        _eval_outputs(variables, batch["image"], batch["label"], model=model))
    keep = batch["mask"]
    logits.append(np.asarray(batch_logits)[keep])
    losses.append(np.asarray(batch_losses)[keep])
    labels.append(batch["label"][keep])
  result = Evaluation(source.root, tuple(source.paths), tuple(class_names),
                      np.concatenate(labels), np.concatenate(logits).astype(np.float32),
                      np.concatenate(losses).astype(np.float32), source)
  if len(result.labels) != len(source) or np.any(result.labels != np.asarray(source.labels)):
    raise RuntimeError(f"Evaluation returned {len(result.labels)} examples for a split of "
                       f"{len(source)}, or in another order; the loader's contract broke.")
  return result


# --- Numbers -------------------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """Counts [C, C]: row = true class, column = predicted class."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def row_normalise(matrix: np.ndarray) -> np.ndarray:
  """Each row divided by its sum (the recall of each class on the diagonal); empty rows 0."""
  sums = matrix.sum(axis=1, keepdims=True)
  return np.divide(matrix, sums, out=np.zeros(matrix.shape, np.float64), where=sums > 0)


def per_class_scores(matrix: np.ndarray, class_names: Sequence[str]) -> list[dict]:
  """Precision, recall, F1 and support per class, then macro and weighted averages.

  A ratio with nothing to divide by (a class never predicted, or never present) is 0,
  as scikit-learn reports it.
  """
  matrix = np.asarray(matrix, np.float64)
  true_positive = np.diag(matrix)
  predicted = matrix.sum(axis=0)
  support = matrix.sum(axis=1)

  def ratio(a, b):
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

  precision = ratio(true_positive, predicted)
  recall = ratio(true_positive, support)
  f1 = ratio(2 * precision * recall, precision + recall)
  rows = [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f),
           "support": int(s)}
          for name, p, r, f, s in zip(class_names, precision, recall, f1, support)]
  weights = support / max(support.sum(), 1)
  for name, average in (("macro avg", np.mean), ("weighted avg", None)):
    values = {k: (float(np.sum(v * weights)) if average is None else float(average(v)))
              for k, v in (("precision", precision), ("recall", recall), ("f1", f1))}
    rows.append({"class": name, **values, "support": int(support.sum())})
  return rows


def class_scores(evaluation: Evaluation) -> list[dict]:
  """`per_class_scores` over the classes that occur among the labels or the predictions
  (scikit-learn's default): a held-out set may hold some of the model's classes only,
  and a class neither present nor predicted says nothing (its rows would be all 0)."""
  matrix = confusion_matrix(evaluation.labels, evaluation.predictions,
                            len(evaluation.class_names))
  occurring = np.flatnonzero(matrix.sum(axis=0) + matrix.sum(axis=1))
  return per_class_scores(matrix[np.ix_(occurring, occurring)],
                          [evaluation.class_names[i] for i in occurring])


def top_losses(evaluation: Evaluation, k: int) -> list[dict]:
  """The `k` misclassified examples with the highest loss, highest first.

  The loss is -log p(true class), so these are the images the model is most
  confidently wrong about: the first place to look for wrong labels.
  """
  predictions = evaluation.predictions
  probabilities = evaluation.probabilities
  wrong = np.flatnonzero(predictions != evaluation.labels)
  order = wrong[np.argsort(-evaluation.losses[wrong], kind="stable")][:k]
  names = evaluation.class_names
  return [{"index": int(i), "path": evaluation.paths[i],
           "file": os.path.join(evaluation.root, evaluation.paths[i]),
           "true": names[evaluation.labels[i]], "predicted": names[predictions[i]],
           "probability": float(probabilities[i, predictions[i]]),
           "true_probability": float(probabilities[i, evaluation.labels[i]]),
           "loss": float(evaluation.losses[i])} for i in order]


def calibration(confidences: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
  """Reliability per confidence bin and the expected calibration error (ECE).

  Bins are equal-width over (0, 1]; bin b holds confidences in (b/bins, (b+1)/bins]
  (a confidence of exactly 0 goes to the first). ECE = Σ_b (n_b / N)·|acc_b − conf_b|,
  where acc_b is the fraction correct and conf_b the mean confidence in bin b.
  """
  confidences = np.asarray(confidences, np.float64)
  correct = np.asarray(correct, np.float64)
  if confidences.shape != correct.shape or confidences.ndim != 1 or not len(confidences):
    raise ValueError(f"calibration needs two equal-length non-empty vectors, got shapes "
                     f"{confidences.shape} and {correct.shape}.")
  if bins < 1:
    raise ValueError(f"bins={bins}; use 1 or more.")
  edges = np.linspace(0.0, 1.0, bins + 1)
  index = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, bins - 1)
  counts = np.bincount(index, minlength=bins)
  safe = np.maximum(counts, 1)
  accuracy = np.bincount(index, weights=correct, minlength=bins) / safe
  confidence = np.bincount(index, weights=confidences, minlength=bins) / safe
  ece = float(np.sum(counts / len(confidences) * np.abs(accuracy - confidence)))
  return {"ece": ece, "edges": edges.tolist(), "counts": counts.tolist(),
          "accuracy": accuracy.tolist(), "confidence": confidence.tolist()}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = 10) -> float:
  """ECE of top-1 predictions: see `calibration`."""
  probabilities = np.asarray(probabilities)
  correct = np.argmax(probabilities, axis=-1) == np.asarray(labels)
  return calibration(probabilities.max(axis=-1), correct, bins)["ece"]


def epoch_curves(rows: list[dict]) -> dict:
  """Per-epoch train and validation loss/accuracy, and the learning rate per step.

  Rows are `metrics.jsonl` rows; a step logged twice (a resumed run redoing steps) keeps
  its last row. Each train row is the mean over the steps since the previous one, so the
  epoch's value weights rows by those step counts: the mean over the epoch's steps.
  """
  latest = {(r["split"], r["step"]): r for r in rows}
  train_rows = sorted((r for (s, _), r in latest.items() if s == "train"),
                      key=lambda r: r["step"])
  val_rows = sorted((r for (s, _), r in latest.items() if s == "val"),
                    key=lambda r: r["step"])
  sums: dict[int, dict] = {}
  previous = 0
  for row in train_rows:
    weight = row["step"] - previous
    previous = row["step"]
    total = sums.setdefault(row.get("epoch", 0), {"loss": 0.0, "accuracy": 0.0, "n": 0})
    total["loss"] += weight * row["loss"]
    total["accuracy"] += weight * row["accuracy"]
    total["n"] += weight
  epochs = sorted(sums)
  return {
      "train_epoch": epochs,
      "train_loss": [sums[e]["loss"] / sums[e]["n"] for e in epochs],
      "train_accuracy": [sums[e]["accuracy"] / sums[e]["n"] for e in epochs],
      "val_epoch": [r.get("epoch", 0) for r in val_rows],
      "val_step": [r["step"] for r in val_rows],
      "val_loss": [r["loss"] for r in val_rows],
      "val_accuracy": [r["accuracy"] for r in val_rows],
      "lr_step": [r["step"] for r in train_rows if "learning_rate" in r],
      "learning_rate": [r["learning_rate"] for r in train_rows if "learning_rate" in r],
  }


def time_to_accuracy(rows: list[dict], targets: Sequence[float] = (0.90, 0.95)) -> dict:
  """Validation accuracy against wall time, and the first time each target was reached.

  Rows are `metrics.jsonl` rows; the "val" rows with a "time" (seconds since the run
  started, counted across resumes; runs before jaxcls 0.3 wrote none) are used, a step
  logged twice keeping its last row. `reached[str(target)]` is {"time", "step",
  "epoch", "accuracy"} of the first evaluation with accuracy >= target, or None.
  """
  latest = {r["step"]: r for r in rows if r.get("split") == "val" and "time" in r}
  points = [latest[step] for step in sorted(latest)]
  reached = {}
  for target in targets:
    first = next((r for r in points if r["accuracy"] >= target), None)
    reached[str(target)] = first and {"time": first["time"], "step": first["step"],
                                      "epoch": first.get("epoch"),
                                      "accuracy": first["accuracy"]}
  return {"time": [r["time"] for r in points], "step": [r["step"] for r in points],
          "accuracy": [r["accuracy"] for r in points], "targets": list(targets),
          "reached": reached}


def format_seconds(seconds: float) -> str:
  """'42.0 s', '12 min 05 s' or '2 h 03 min'."""
  if seconds < 60:
    return f"{seconds:.1f} s"
  minutes = int(seconds // 60)
  if minutes < 60:
    return f"{minutes} min {int(seconds % 60):02d} s"
  return f"{minutes // 60} h {minutes % 60:02d} min"


# --- Figures (matplotlib's Agg renderer through Figure: no pyplot, no global state) ---


def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # Imported here: training never needs it.
  return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_curves(curves: dict, path: str) -> None:
  fig = _figure(13, 3.8)
  loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
  for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
    ax.plot(curves["train_epoch"], curves[f"train_{key}"], "o-", label="train")
    ax.plot(curves["val_epoch"], curves[f"val_{key}"], "s-", label="validation")
    ax.set(xlabel="epoch", ylabel=key, title=key)
    ax.grid(alpha=0.3)
    ax.legend()
  lr_ax.plot(curves["lr_step"], curves["learning_rate"], ".-")
  lr_ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
  lr_ax.grid(alpha=0.3)
  fig.savefig(path)


def plot_time_to_accuracy(curve: dict, path: str) -> None:
  """Validation accuracy against wall time (minutes past 10 minutes), each target
  dashed and marked where first reached."""
  minutes = bool(curve["time"]) and curve["time"][-1] > 600
  scale, unit = (60.0, "min") if minutes else (1.0, "s")
  fig = _figure(6.5, 4.2)
  ax = fig.subplots()
  ax.plot([t / scale for t in curve["time"]], curve["accuracy"], "s-", label="validation")
  for target in curve["targets"]:
    first = curve["reached"][str(target)]
    ax.axhline(target, ls="--", color="gray", lw=0.8)
    if first:
      ax.plot(first["time"] / scale, first["accuracy"], "o", ms=10, mfc="none",
              color="tab:red")
      ax.annotate(f"{target:g} at {format_seconds(first['time'])}",
                  (first["time"] / scale, first["accuracy"]), textcoords="offset points",
                  xytext=(6, -14), fontsize=8)
  ax.set(xlabel=f"wall time since the run started ({unit})", ylabel="accuracy",
         title="validation accuracy against time")
  ax.grid(alpha=0.3)
  fig.savefig(path)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str) -> None:
  size = max(4.0, 0.45 * len(class_names) + 2.5)
  fig = _figure(2 * size + 1, size)
  annotate = len(class_names) <= ANNOTATE_MAX_CLASSES
  for ax, values, title, fmt in zip(
      fig.subplots(1, 2), (matrix, row_normalise(matrix)),
      ("counts", "row-normalised (recall on the diagonal)"), ("{:d}", "{:.2f}")):
    image = ax.imshow(values, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90 if len(class_names) > 6 else 0)
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if annotate:
      top = values.max() or 1
      for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, fmt.format(value.item()), ha="center", va="center", fontsize=8,
                color="white" if value > top / 2 else "black")
  fig.savefig(path)


def plot_reliability(cal: dict, path: str) -> None:
  fig = _figure(5.5, 6.5)
  top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
  edges = np.asarray(cal["edges"])
  centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
  filled = np.asarray(cal["counts"]) > 0
  top.bar(centers[filled], np.asarray(cal["accuracy"])[filled], width=width[filled],
          edgecolor="black", label="accuracy")
  top.plot(np.asarray(cal["confidence"])[filled], np.asarray(cal["accuracy"])[filled],
           "o", color="tab:red", label="mean confidence")
  top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
  top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
          title=f"reliability: ECE = {cal['ece']:.4f}")
  top.legend(loc="upper left")
  bottom.bar(centers, cal["counts"], width=width, edgecolor="black", color="tab:gray")
  bottom.set(xlabel="confidence (top-1 probability)", ylabel="images")
  fig.savefig(path)


def save_thumbnail(source, index: int, out_path: str) -> None:
  """Example `index` of `source` as stored (not resized for the model), upright and at
  most THUMBNAIL_SIZE px, as PNG. Read through the source: a file, a zip member or a
  TFDS record alike (a decode cache is looked through to the original)."""
  from PIL import Image
  original = getattr(source, "source", source)  # jaxcls.data.cache keeps the original.
  img = preprocess.decode(original[index]["data"], draft_size=THUMBNAIL_SIZE)
  img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
  img.save(out_path)


def plot_top_losses(items: list[dict], thumbnails: list[str], path: str,
                    columns: int = 6) -> None:
  from PIL import Image
  rows = max(1, -(-len(items) // columns))
  fig = _figure(2.3 * columns, 2.8 * rows)
  axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
  for ax in axes:
    ax.axis("off")
  for ax, item, thumb in zip(axes, items, thumbnails):
    with Image.open(thumb) as img:
      ax.imshow(np.asarray(img.convert("RGB")))
    name = os.path.basename(item["path"])
    name = name if len(name) <= 26 else "…" + name[-25:]
    ax.set_title(f"{name}\ntrue {item['true']}\npred {item['predicted']} "
                 f"({item['probability']:.2f})", fontsize=8)
  if not items:
    axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
  fig.savefig(path)


# --- Text and HTML ------------------------------------------------------------------


def format_table(scores: list[dict]) -> str:
  width = max(12, *(len(r["class"]) for r in scores))
  lines = [f"{'class':>{width}}  precision  recall      f1  support"]
  for r in scores:
    lines.append(f"{r['class']:>{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  "
                 f"{r['f1']:6.4f}  {r['support']:7d}")
  return "\n".join(lines)


_STYLE = """body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;width:180px}
.gallery img{width:160px}.gallery figcaption{font-size:12px;word-break:break-all}"""


def _facts(summary: dict) -> list[tuple[str, Any]]:
  recorded = summary.get("recorded_accuracy")
  facts = [("workdir", summary["workdir"]), ("checkpoint step", summary["step"]),
           ("epoch", summary.get("epoch")), ("classes", ", ".join(summary["class_names"]))]
  if "data" in summary:
    facts.append(("data", summary["data"] + (f" ({summary['split']})"
                                             if summary.get("split") else "")))
  facts += [(f"{summary['subset']} images", summary["count"])]
  if "skipped" in summary:
    facts.append(("files skipped (cannot be decoded)", len(summary["skipped"])))
  facts += [("accuracy", f"{summary['accuracy']:.4f}"), ("loss", f"{summary['loss']:.4f}"),
            ("data (top-loss paths are relative to it)", summary["data_root"])]
  if "recorded_accuracy" in summary:
    facts.append(("accuracy recorded in metrics.jsonl", "none" if recorded is None
                  else f"{recorded:.4f}"))
  facts.append(("expected calibration error", f"{summary['ece']:.4f} "
                f"({summary['bins']} bins)"))
  facts += time_to_accuracy_lines(summary)
  return facts


def time_to_accuracy_lines(summary: dict) -> list[tuple[str, str]]:
  """("time to validation accuracy 0.9", "4 min 10 s (step 300, epoch 3)" or "not
  reached") per target; none when the run recorded no times."""
  curve = summary.get("time_to_accuracy")
  if not curve or not curve["time"]:
    return []
  lines = []
  for target in curve["targets"]:
    first = curve["reached"][str(target)]
    lines.append((f"time to validation accuracy {target:g}", "not reached" if not first
                  else f"{format_seconds(first['time'])} (step {first['step']}, epoch "
                       f"{first['epoch']})"))
  return lines


def _html(summary: dict, scores: list[dict], top: list[dict]) -> str:
  e = html.escape
  subset = summary["subset"]  # "validation" or "held-out": what was evaluated.
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>jaxcls report: "
           f"{e(summary['workdir'])}</title><style>{_STYLE}</style></head><body>",
           "<h1>What the model learned</h1><table>"]
  parts += [f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in _facts(summary)]
  parts.append("</table>")
  if summary["files"].get("curves"):
    parts.append("<h2>Training curves</h2><img src='curves.png' alt='training curves'>")
  if summary["files"].get("time_to_accuracy"):
    parts.append("<h2>Time to accuracy</h2><img src='time_to_accuracy.png' "
                 "alt='validation accuracy against wall time'>")
  parts.append(f"<h2>Confusion matrix ({e(subset)})</h2>"
               "<img src='confusion_matrix.png' alt='confusion matrix'>")
  parts.append("<h2>Per-class scores</h2><table><tr><th>class</th><th>precision</th>"
               "<th>recall</th><th>F1</th><th>support</th></tr>")
  parts += [f"<tr><td>{e(r['class'])}</td><td>{r['precision']:.4f}</td>"
            f"<td>{r['recall']:.4f}</td><td>{r['f1']:.4f}</td><td>{r['support']}</td></tr>"
            for r in scores]
  parts.append("</table>")
  parts.append(f"<h2>Calibration</h2><p>Expected calibration error: "
               f"<b>{summary['ece']:.4f}</b> (the gap between confidence and accuracy, "
               f"averaged over {summary['bins']} confidence bins, weighted by images).</p>"
               "<img src='reliability.png' alt='reliability diagram'>")
  parts.append(f"<h2>Top losses</h2><p>The {len(top)} misclassified {e(subset)} images "
               "with the highest loss (most confidently wrong), highest first. Wrong "
               "labels show up here.</p><div class='gallery'>")
  for rank, item in enumerate(top):
    parts.append(
        f"<figure><img src='top_losses/{rank:03d}.png' alt='{e(item['path'])}'>"
        f"<figcaption><b title='{e(item['file'])}'>{e(item['path'])}</b><br>true: {e(item['true'])}<br>"
        f"predicted: {e(item['predicted'])} ({item['probability']:.3f})<br>"
        f"loss: {item['loss']:.3f}</figcaption></figure>")
  if not top:
    parts.append(f"<p>No {e(subset)} image is misclassified.</p>")
  parts.append("</div></body></html>")
  return "\n".join(parts)


# --- The report ---------------------------------------------------------------------


def _recorded_val(rows: list[dict], step: int) -> dict | None:
  found = [r for r in rows if r.get("split") == "val" and r.get("step") == step]
  return found[-1] if found else None


def load_validation(workdir: str, step: int | None = None,
                    progress: bool = True) -> tuple[Evaluation, dict]:
  """Evaluates a checkpoint (the Predictor's default, or `step`) on its validation split.

  Returns the per-example Evaluation and the checkpoint's metadata.
  """
  run = workdir_lib.load_run(workdir, step)
  config = run.config
  workers = sources.worker_count(config.data.workers)
  dataset = sources.build_dataset(config.data, config.seed, workdir, workers)
  if tuple(dataset.class_names) != tuple(run.class_names):
    raise sources.DataError(
        f"The checkpoint was trained on classes {list(run.class_names)}, but "
        f"{config.data.source} now has {list(dataset.class_names)}. Restore the data "
        "as it was for training.")
  evaluation = evaluate_examples(
      run.variables, run.model, dataset.val, run.class_names,
      batch_size=config.batch_size, image_size=config.data.image_size, workers=workers,
      progress=progress)
  return evaluation, run.meta


def build_report(workdir: str, step: int | None = None, out_dir: str | None = None, *,
                 top_k: int = 24, bins: int = 10, progress: bool = True,
                 targets: Sequence[float] = (0.90, 0.95)) -> dict:
  """Writes the report of a checkpoint on its validation split; returns its summary
  (also saved as report.json)."""
  workdir = os.path.abspath(workdir)
  out_dir = os.path.abspath(out_dir or os.path.join(workdir, REPORT_DIR))
  evaluation, meta = load_validation(workdir, step, progress)
  rows = metric_writers.read_metrics(workdir)
  recorded = _recorded_val(rows, meta.step)
  about = {"workdir": workdir, "step": meta.step, "epoch": meta.epoch,
           "subset": "validation",
           "recorded_accuracy": recorded["accuracy"] if recorded else None,
           "recorded_loss": recorded["loss"] if recorded else None}
  return write_report(evaluation, out_dir, about, metrics_rows=rows, top_k=top_k,
                      bins=bins, targets=targets)


def _clear_gallery(out_dir: str) -> str:
  gallery = os.path.join(out_dir, "top_losses")
  os.makedirs(gallery, exist_ok=True)
  for name in os.listdir(gallery):  # An earlier report's pictures would linger.
    if name.endswith(".png") and name[:-4].isdigit():
      os.remove(os.path.join(gallery, name))
  return gallery


def write_report(evaluation: Evaluation, out_dir: str, about: dict, *,
                 metrics_rows: Sequence[dict] = (), top_k: int = 24,
                 bins: int = 10, targets: Sequence[float] = (0.90, 0.95)) -> dict:
  """Writes the figures, tables and pages of `evaluation` into `out_dir`.

  `about` describes what was evaluated and goes into the summary as it is: at least
  "workdir", "step", "epoch" and "subset" ("validation", "held-out"). The training
  curves are drawn from `metrics_rows` when there are any, and the time to each of
  `targets` validation accuracy when they hold times. Returns the summary (also saved
  as report.json).
  """
  out_dir = os.path.abspath(out_dir)
  gallery = _clear_gallery(out_dir)
  names = evaluation.class_names
  matrix = confusion_matrix(evaluation.labels, evaluation.predictions, len(names))
  scores = class_scores(evaluation)
  cal = calibration(evaluation.probabilities.max(axis=-1),
                    evaluation.predictions == evaluation.labels, bins)
  top = top_losses(evaluation, top_k)
  files = {"confusion_matrix": "confusion_matrix.png", "per_class": "per_class.csv",
           "reliability": "reliability.png", "top_losses": "top_losses.png",
           "summary": "report.json", "html": "index.html"}
  if metrics_rows:
    files["curves"] = "curves.png"
    plot_curves(epoch_curves(list(metrics_rows)), os.path.join(out_dir, files["curves"]))
  timed = time_to_accuracy(list(metrics_rows), targets)
  if timed["time"]:
    files["time_to_accuracy"] = "time_to_accuracy.png"
    plot_time_to_accuracy(timed, os.path.join(out_dir, files["time_to_accuracy"]))
  plot_confusion(matrix, names, os.path.join(out_dir, files["confusion_matrix"]))
  plot_reliability(cal, os.path.join(out_dir, files["reliability"]))
  thumbnails = [os.path.join(gallery, f"{rank:03d}.png") for rank in range(len(top))]
  for item, thumb in zip(top, thumbnails):
    save_thumbnail(evaluation.source, item["index"], thumb)
  plot_top_losses(top, thumbnails, os.path.join(out_dir, files["top_losses"]))
  with open(os.path.join(out_dir, files["per_class"]), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
    writer.writeheader()
    writer.writerows(scores)
  summary = {
      **about, "report_dir": out_dir, "data_root": evaluation.root,
      "class_names": list(names), "count": int(len(evaluation.labels)),
      "accuracy": evaluation.accuracy, "loss": evaluation.loss,
      "ece": cal["ece"], "bins": bins, "calibration": cal,
      "confusion_matrix": matrix.tolist(), "per_class": scores, "top_losses": top,
      "time_to_accuracy": timed, "files": files}
  with open(os.path.join(out_dir, files["summary"]), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(out_dir, files["html"]), "w", encoding="utf-8") as f:
    f.write(_html(summary, scores, top))
  return summary
