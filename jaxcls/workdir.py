"""A run on disk: what a workdir holds, what its checkpoints record, and loading it back.

    WORKDIR/
      checkpoints/STEP/     Orbax: the train state and this module's `RunMeta` (JSON)
      config.json           the config the run used
      metrics.jsonl         one JSON object per logged interval and evaluation
      tensorboard/          the same scalars as TensorBoard events
      skipped_files.jsonl   inputs that could not be decoded (path, reason)
      verified_files.json   the decode check's cache
      cache/                decoded images (data.cache=disk)
      report/               what `jaxcls-report` writes

`RunMeta` is the one record of a checkpoint besides the arrays; `load_run` is the one way
to get a trained model back (Predictor, transfer learning, the report and evaluation all
use it); `save_checkpoint` is the one way to write one (training and the weights import).

A backbone registered outside jaxcls (in the user's recipe, say) is recorded with every
checkpoint (`RunMeta.backbone_origin`: the module and file whose import registered it),
and `load_run` imports that file again when the name is not registered, so every
program that loads a run builds the model the recipe defined. If the file has moved,
$JAXCLS_MODEL_FILE names where it is now. Loading a run therefore runs the Python file
it names: load runs you trust, as you would their recipes.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import tempfile
from typing import Any

import jax
import ml_collections

from jaxcls import checkpoint
from jaxcls import config as config_lib
from jaxcls.errors import JaxclsError
from jaxcls.guards import WorkdirError
from jaxcls.models import BACKBONES, UnknownModelError, create_model
from jaxcls.steps import create_train_state

CONFIG_FILE = "config.json"
# A file that registers the run's backbone, for when the one the run recorded has moved.
MODEL_FILE_ENV = "JAXCLS_MODEL_FILE"
FORMAT_VERSION = 2  # 1: the untyped dict written before 2026-12 (no "format_version").


class NoCheckpointError(JaxclsError, FileNotFoundError):
  """The workdir holds no finished checkpoint."""


class UnknownStepError(JaxclsError, ValueError):
  """No checkpoint at the requested step."""


@dataclasses.dataclass
class EpochMetrics:
  """A finished epoch's training means and validation result."""
  epoch: int
  step: int
  train_loss: float
  train_accuracy: float
  val_loss: float
  val_accuracy: float
  val_ema_loss: float | None = None  # The weight average's, when optim.ema_decay > 0.
  val_ema_accuracy: float | None = None


@dataclasses.dataclass
class Best:
  """The best validation accuracy so far and where it was reached."""
  val_accuracy: float
  epoch: int
  step: int


@dataclasses.dataclass
class EpochSums:
  """Training loss and accuracy summed over the steps of the epoch in progress."""
  loss: float = 0.0
  accuracy: float = 0.0
  steps: int = 0

  def add(self, loss: float, accuracy: float) -> None:
    self.loss += loss
    self.accuracy += accuracy
    self.steps += 1


@dataclasses.dataclass
class Progress:
  """What a run knows beyond its arrays, saved with every checkpoint so a resumed run
  continues its epoch means, early stopping and best-checkpoint choice exactly."""
  best: Best | None = None
  best_ema: Best | None = None  # The weight average's, when optim.ema_decay > 0.
  epoch_sums: EpochSums = dataclasses.field(default_factory=EpochSums)
  last_epoch: EpochMetrics | None = None
  # Wall seconds the run has spent up to this checkpoint, over every session that
  # resumed it: a resumed run's clock (metrics.jsonl "time") continues from here.
  elapsed_seconds: float = 0.0


@dataclasses.dataclass
class RunMeta:
  """The JSON item of every checkpoint."""
  config: dict  # ConfigDict.to_dict() of the config trained with.
  class_names: tuple[str, ...]
  step: int
  epoch: int  # Completed epochs at `step`.
  progress: Progress = dataclasses.field(default_factory=Progress)
  imported_from: dict | None = None  # Set by `jaxcls.pretrained` for converted weights.
  # What registered a backbone from outside jaxcls: {"module", "file"} (`backbone_origin`).
  backbone_origin: dict | None = None

  def to_json(self) -> dict:
    progress = dataclasses.asdict(self.progress)
    return {"format_version": FORMAT_VERSION, "config": self.config,
            "class_names": list(self.class_names), "step": self.step, "epoch": self.epoch,
            # Also at the top level, as version 1 wrote it: older jaxcls reads "metrics".
            "metrics": progress["last_epoch"] or {},
            "progress": progress, "imported_from": self.imported_from,
            "backbone_origin": self.backbone_origin}

  @classmethod
  def from_json(cls, data: dict) -> "RunMeta":
    """Reads version 2 and version 1 (an untyped dict with "metrics" beside "progress")."""
    progress = data.get("progress") or {}
    best, best_ema = progress.get("best"), progress.get("best_ema")
    sums = progress.get("epoch_sums") or {}
    last = progress.get("last_epoch") or data.get("metrics") or None
    return cls(
        config=data["config"], class_names=tuple(data["class_names"]),
        step=int(data.get("step", 0)), epoch=int(data.get("epoch", 0)),
        progress=Progress(
            best=_known_fields(Best, best) if best else None,
            best_ema=_known_fields(Best, best_ema) if best_ema else None,
            epoch_sums=EpochSums(**{k: sums[k] for k in ("loss", "accuracy", "steps")
                                    if k in sums}),
            last_epoch=_known_fields(EpochMetrics, last) if last else None,
            elapsed_seconds=float(progress.get("elapsed_seconds", 0.0))),
        imported_from=data.get("imported_from"),
        backbone_origin=data.get("backbone_origin"))

  def training_config(self) -> ml_collections.ConfigDict:
    """The config the run trained with, on today's schema (renamed keys migrated)."""
    return config_lib.from_dict(self.config)

  def describe(self, weights: str = "raw") -> str:
    """'step 12 (epoch 2, val accuracy 0.9167)', or 'step 7 (mid-epoch 2)'; with
    weights="ema", the weight average's val accuracy where the run recorded it."""
    last = self.progress.last_epoch
    if last is not None and last.step == self.step:
      accuracy = last.val_accuracy
      if weights == "ema" and last.val_ema_accuracy is not None:
        accuracy = last.val_ema_accuracy
      return f"step {self.step} (epoch {last.epoch}, val accuracy {accuracy:.4f})"
    return f"step {self.step} (mid-epoch {self.epoch + 1})"


def _known_fields(cls, values: dict):
  names = {field.name for field in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in values.items() if k in names})


def prepare(workdir: str) -> str:
  """Creates `workdir` and checks it takes writes; returns its absolute path."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as e:
    raise WorkdirError(f"Cannot write to workdir '{workdir}' ({e.strerror or e}). "
                       "Choose a writable --workdir or fix its permissions.") from None
  return workdir


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config_lib.to_json(config))


def save_checkpoint(mngr, state: Any, meta: RunMeta,
                    val_accuracy: float | None = None) -> None:
  """Saves `state` with `meta` at `meta.step` (asynchronously where the manager is),
  recording where a backbone registered outside jaxcls comes from.

  `val_accuracy` (epoch ends) ranks the checkpoint for the best; the weight average's
  accuracy, which `meta` records for the epoch ending at this step, ranks it among the
  average's."""
  if meta.backbone_origin is None:
    meta = dataclasses.replace(
        meta, backbone_origin=backbone_origin(meta.config["model"]["name"]))
  last = meta.progress.last_epoch
  ema_accuracy = (last.val_ema_accuracy if val_accuracy is not None and last is not None
                  and last.step == meta.step else None)
  checkpoint.save(mngr, meta.step, state, meta.to_json(), val_accuracy=val_accuracy,
                  val_ema_accuracy=ema_accuracy)


def read_meta(mngr, step: int | None = None) -> RunMeta:
  return RunMeta.from_json(checkpoint.restore_meta(mngr, step))


@dataclasses.dataclass
class LoadedRun:
  """A trained model back from its workdir: everything predict and evaluation need."""
  workdir: str
  step: int
  meta: RunMeta
  config: ml_collections.ConfigDict
  model: Any  # The `jaxcls.models.Classifier`, for inference (no pmap axis).
  variables: dict  # {"params", "batch_stats"} as host arrays.
  description: str  # "the best checkpoint: step 12 (epoch 2, val accuracy 0.9167)"

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.meta.class_names


WEIGHTS = ("raw", "ema")


class WeightsChoiceError(JaxclsError, ValueError):
  """Weights the checkpoint does not hold were asked for."""


def _check_weights(weights: str, config, workdir: str) -> None:
  if weights not in WEIGHTS:
    raise WeightsChoiceError(f"weights={weights!r}; use one of {', '.join(WEIGHTS)}.")
  if weights == "ema" and not config.optim.ema_decay:
    raise WeightsChoiceError(
        f"The run in '{workdir}' kept no weight average, so weights='ema' cannot be "
        "used; use the raw weights, or train with --config.optim.ema_decay=0.999.")


def load_run(workdir: str, step: int | None = None, weights: str = "raw") -> LoadedRun:
  """The model and weights of one checkpoint, rebuilt from the checkpoint alone.

  By default the checkpoint where `weights` had the best validation accuracy (the
  latest one if none was validated yet); `step` picks another. `weights="ema"` takes the
  weight average that runs with optim.ema_decay > 0 keep beside the weights, from the
  checkpoint where the average was best. Raises FileNotFoundError
  when there is no checkpoint and ValueError for a step that is not there.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    raise NoCheckpointError(f"No checkpoints in '{workdir}'. Train first: python "
                            "run_train.py --config CONFIG --workdir DIR.")
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise NoCheckpointError(f"No finished checkpoint in '{workdir}'.")
    chosen = checkpoint.best_step(mngr, weights) if step is None else step
    if chosen not in steps:
      raise UnknownStepError(f"No checkpoint at step {chosen} in '{workdir}'; have "
                             f"{steps}.")
    meta = read_meta(mngr, chosen)
    config = meta.training_config()
    _check_weights(weights, config, workdir)
    register_backbone(config.model.name, meta.backbone_origin, workdir)
    model = create_model(config.model, len(meta.class_names))
    target = jax.eval_shape(lambda: create_train_state(config, model, jax.random.key(0), 1))
    state = checkpoint.restore_state(mngr, chosen, target)
  finally:
    mngr.close()
  which = "requested" if step is not None else (
      "best" if meta.progress.last_epoch and meta.progress.last_epoch.step == chosen
      else "latest")
  variables = (state.ema if weights == "ema" else
               {"params": state.params, "batch_stats": state.batch_stats})
  average = ", its weight average" if weights == "ema" else ""
  return LoadedRun(workdir, chosen, meta, config, model, variables,
                   f"the {which} checkpoint: {meta.describe(weights)}{average}")


def backbone_origin(name: str) -> dict | None:
  """Where the backbone registered as `name` is defined, as checkpoints record it:
  {"module": its module's name, "file": that module's file} for one registered outside
  jaxcls (a recipe, the user's package); None for jaxcls's own or an unknown name."""
  build = BACKBONES.get(name)
  module = getattr(build, "__module__", None) or ""
  if build is None or module == "jaxcls" or module.startswith("jaxcls."):
    return None
  file = getattr(sys.modules.get(module), "__file__", None)
  return {"module": module, "file": os.path.abspath(file) if file else None}


def register_backbone(name: str, origin: dict | None, workdir: str) -> None:
  """Makes model.name `name` buildable: when it is not registered yet, imports the file
  that $JAXCLS_MODEL_FILE names, else the module or recipe file `origin` records (the
  one whose import registered it while the run trained)."""
  if name in BACKBONES:
    return
  fix = (f"set {MODEL_FILE_ENV} to the file that registers it where it is now (e.g. "
         f"{MODEL_FILE_ENV}=path/to/my_model.py), or import that file before loading "
         "the run")
  override = os.environ.get(MODEL_FILE_ENV)
  if override:
    if not os.path.isfile(override):
      raise UnknownModelError(f"{MODEL_FILE_ENV}='{override}' is not a file; point it "
                              f"at the file that registers model.name '{name}'.")
    _import_file(name, os.path.abspath(override), fix)
  elif origin:
    _import_origin(name, origin, workdir, fix)
  else:  # Runs written before jaxcls 0.3 record nothing.
    raise UnknownModelError(
        f"model.name '{name}' is not a registered model, and the run in '{workdir}' "
        f"records no file that registers it; {fix}.")


def _import_origin(name: str, origin: dict, workdir: str, fix: str) -> None:
  module, file = origin.get("module") or "", origin.get("file")
  if module == "__main__":
    raise UnknownModelError(
        f"model.name '{name}' was registered by the script {file} run as a program, "
        f"which loading a run does not run again; {fix}.")
  if module and not module.startswith(config_lib.RECIPE_MODULE_PREFIX):
    try:
      importlib.import_module(module)
      return _check_registered(name, f"module '{module}'", fix)
    except ModuleNotFoundError as e:
      if not (module == e.name or module.startswith(f"{e.name}.")):
        raise UnknownModelError(f"Importing module '{module}', which registers "
                                f"model.name '{name}', failed: {_one_line(e)}.") from e
  if file and os.path.isfile(file):
    return _import_file(name, file, fix)
  raise UnknownModelError(
      f"model.name '{name}' is registered by {file or module}, which the run in "
      f"'{workdir}' recorded, and that file is no longer there; {fix}.")


def _import_file(name: str, file: str, fix: str) -> None:
  try:
    config_lib.import_recipe(file)
  except Exception as e:  # The user's code: whatever it raises, say where.
    raise UnknownModelError(f"Importing {file}, which registers model.name '{name}', "
                            f"failed: {type(e).__name__}: {_one_line(e)}") from e
  _check_registered(name, file, fix)


def _check_registered(name: str, imported: str, fix: str) -> None:
  if name not in BACKBONES:
    raise UnknownModelError(f"{imported} was imported but registers no model.name "
                            f"'{name}'; {fix}.")


def _one_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__
