"""A trained model on held-out data: every example of a folder, a zip or a TFDS split.

    jaxcls-evaluate --workdir DIR --data folder:TEST_DIR [--step N] [--json] [--report OUT]

(the program is `jaxcls/cli/evaluate.py`). The evaluation is training's own, on other
data: the checkpoint comes from `workdir.load_run` (the best one, or `step`, as predict
picks it); the held-out set from `sources.build_held_out`, which lists every example
(nothing is split off), skips the files that cannot be decoded and labels each example
by class name in the model's classes; and the numbers from `report.evaluate_examples`
(`loader.eval_batches` at the image size trained with, padded and masked, through
`steps.eval_outputs`) and `report.class_scores`. Accuracy and loss are therefore
computed exactly as the validation metrics in `metrics.jsonl` are: the same images give
the same accuracy.

Nothing is written into the training's workdir. The files left out are returned (and
printed by the program); `write_report` draws `jaxcls.report`'s figures and tables for
the held-out set and writes OUT/skipped_files.jsonl beside them.
"""

from __future__ import annotations

import dataclasses
import os

from jaxcls import report
from jaxcls import workdir as workdir_lib
from jaxcls.data import sources
from jaxcls.data.sources.base import write_skipped


@dataclasses.dataclass
class HeldOutResult:
  """A checkpoint's results on one held-out set."""
  workdir: str
  step: int
  epoch: int
  checkpoint: str  # Which one and why: "the best checkpoint: step 12 (epoch 2, ...)".
  data: str  # "folder:DIR", "zip:PATH" or "tfds:NAME".
  split: str | None  # The TFDS split; None for a folder or zip (evaluated whole).
  data_class_names: tuple[str, ...]  # The classes the set holds, some of the model's.
  skipped: tuple[dict, ...]  # {"path", "reason"} of each file that cannot be decoded.
  evaluation: report.Evaluation  # Per example, labels in the model's classes.

  @property
  def scores(self) -> list[dict]:
    """Precision, recall, F1 and support per class, then macro and weighted averages."""
    return report.class_scores(self.evaluation)

  def to_json(self) -> dict:
    evaluation = self.evaluation
    matrix = report.confusion_matrix(evaluation.labels, evaluation.predictions,
                                     len(evaluation.class_names))
    return {"workdir": self.workdir, "step": self.step, "epoch": self.epoch,
            "checkpoint": self.checkpoint, "data": self.data, "split": self.split,
            "data_root": evaluation.root, "class_names": list(evaluation.class_names),
            "data_class_names": list(self.data_class_names),
            "count": int(len(evaluation.labels)), "accuracy": evaluation.accuracy,
            "loss": evaluation.loss, "per_class": self.scores,
            "confusion_matrix": matrix.tolist(),
            "skipped": [dict(row) for row in self.skipped]}


def evaluate(workdir: str, data: str, *, split: str | None = None,
             step: int | None = None, weights: str = "raw", batch_size: int | None = None,
             workers: int = 0,
             tfds_data_dir: str | None = None, cache_dir: str | None = None,
             progress: bool = True) -> HeldOutResult:
  """Evaluates a checkpoint of `workdir` on every readable example of `data`.

  `weights="ema"` evaluates the weight average (runs with optim.ema_decay > 0).
  `batch_size` defaults to the training's (it changes no number, only memory and
  speed); `workers` decode threads (0: the training's setting, else one per core);
  `tfds_data_dir` defaults to the training's; `cache_dir`, if set, keeps the decode
  check's verdicts (verified_files.json) so a second evaluation decodes only new files.
  """
  run = workdir_lib.load_run(workdir, step, weights)
  data_config = run.config.data.copy_and_resolve_references()
  if tfds_data_dir is not None:
    data_config.tfds_data_dir = tfds_data_dir
  workers = sources.worker_count(workers or data_config.workers)
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
  held_out = sources.build_held_out(data, data_config, class_names=run.class_names,
                                    split=split, cache_dir=cache_dir, workers=workers)
  evaluation = report.evaluate_examples(
      run.variables, run.model, held_out.source, run.class_names,
      batch_size=batch_size or run.config.batch_size, image_size=data_config.image_size,
      workers=workers, progress=progress)
  return HeldOutResult(run.workdir, run.step, run.meta.epoch, run.description, data,
                       split, held_out.data_class_names, held_out.skipped, evaluation)


def write_report(result: HeldOutResult, out_dir: str, *, top_k: int = 24,
                 bins: int = 10) -> dict:
  """`jaxcls.report`'s figures and tables for the held-out set, in `out_dir`, and
  `out_dir`/skipped_files.jsonl; returns the report's summary (report.json)."""
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  write_skipped(result.skipped, out_dir)
  about = {"workdir": result.workdir, "step": result.step, "epoch": result.epoch,
           "subset": "held-out", "checkpoint": result.checkpoint, "data": result.data,
           "split": result.split, "data_class_names": list(result.data_class_names),
           "skipped": [dict(row) for row in result.skipped]}
  return report.write_report(result.evaluation, out_dir, about, top_k=top_k, bins=bins)
