"""Hyperparameter sweeps: Optuna's samplers and pruners over ordinary jaxcls runs.

A sweep is an Optuna study kept in a database (by default `DIR/study.db`, SQLite). Each
trial takes values for some config keys from the search space, trains an ordinary run in
`DIR/trial_NNN/` with `jaxcls.train.train_and_evaluate`, reports the validation accuracy
after every epoch (a pruner may stop it there) and ends with the best one. Running the
same sweep again continues it to N trials: finished trials are never rerun, and a trial
that was killed midway is marked FAIL and rerun as a new trial with the same parameters
(the way Optuna's `RetryHeartbeatStaleTrialCallback` does), continuing from the killed
trial's last checkpoint (docs/sweep.md).

The space: `KEY=loguniform(LO,HI)`, `uniform(LO,HI)`, `int(LO,HI)` or `choice(A,B,...)`
(`parse_space`), or a Python file defining `space(trial) -> {key: value}` (`load_space_file`),
or both. Command-line parsing lives in `jaxcls/cli/sweep.py`; this module needs Optuna
(`pip install 'jaxcls[sweep]'`), and nothing else in jaxcls imports it.
"""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import hashlib
import importlib.util
import json
import contextlib
import logging
import os
import re
import shutil
import socket
import time
import warnings
from typing import Any, Callable, Sequence

import ml_collections
import optuna
from optuna.trial import TrialState

from jaxcls import config as config_lib
from jaxcls import tracking, train
from jaxcls.errors import JaxclsError

log = logging.getLogger("jaxcls")

STUDY_NAME = "jaxcls-sweep"
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
# A trial counts towards N when it ran to an outcome of its own, is running or waits to
# run; FAIL counts only for a run that diverged (an outcome of its parameters). Killed,
# stopped and erroring trials, and trials started after N were under way, do not.
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
_OWNER_KEYS = ("host", "pid", "pid_start")  # Which process runs a trial.


class SpaceError(JaxclsError):
  """A search space that cannot be searched: unknown key, bad distribution, bad value."""


class SweepStopped(Exception):
  """A signal stopped the sweep inside a trial (its checkpoint is saved)."""

  def __init__(self, signal_name: str, trial_number: int):
    super().__init__(signal_name, trial_number)
    self.signal_name, self.trial_number = signal_name, trial_number


class SurplusTrial(Exception):
  """This trial started after N trials were under way (another process raced it)."""


# ------------------------------------------------------------------------------- space


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One searched key: `kind` is one of DISTRIBUTIONS; `choices` are the config values."""
  key: str
  kind: str
  text: str  # As given, for messages.
  low: float = 0.0
  high: float = 0.0
  choices: tuple = ()

  def suggest(self, trial) -> Any:
    """The trial's value for this key, as the config holds it."""
    if self.kind == "choice":
      labels = [_choice_label(c) for c in self.choices]
      picked = trial.suggest_categorical(self.key, labels)
      return self.choices[labels.index(picked)]
    if self.kind == "int":
      return trial.suggest_int(self.key, int(self.low), int(self.high))
    return trial.suggest_float(self.key, self.low, self.high,
                               log=self.kind == "loguniform")


def _choice_label(value: Any) -> Any:
  """What Optuna stores for a choice: itself when a scalar, its text when a tuple."""
  return value if isinstance(value, (bool, int, float, str)) else repr(tuple(value))


_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*([a-z_]\w*)\s*\((.*)\)\s*$", re.S)


def parse_space(specs: Sequence[str], config: ml_collections.ConfigDict
                ) -> list[Dimension]:
  """Dimensions from `KEY=DIST(ARGS)` texts, checked against `config`'s schema.

  Raises SpaceError naming the text, the problem and the fix: an unknown key (with the
  closest known ones), an unknown distribution, LO >= HI, loguniform with LO <= 0, a
  distribution the key's type cannot take, a choice value of the wrong type, or an
  endpoint or choice the schema refuses (e.g. model.dropout=uniform(0,1): 1 is not < 1).
  """
  known = config_lib.flatten(config)
  dims = []
  for text in specs:
    match = _SPEC.match(text)
    if not match:
      raise SpaceError(f"--space '{text}': expected KEY=DISTRIBUTION(...), e.g. "
                       "optim.learning_rate=loguniform(1e-4,1e-1).")
    key, kind, args = match.groups()
    if key not in known:
      raise SpaceError(str(config_lib.unknown_key_error(key, known, f" (--space {text})")))
    if any(d.key == key for d in dims):
      raise SpaceError(f"--space '{text}': {key} is searched twice; give it once.")
    dims.append(_dimension(key, kind, _split_args(args), text, known[key]))
    for value in _endpoints(dims[-1]):
      check_values(config, {key: value}, f"--space '{text}'")
  return dims


def _endpoints(dim: Dimension) -> list:
  """The values whose acceptance by the schema stands for the whole dimension."""
  if dim.kind == "choice":
    return list(dim.choices)
  cast = int if dim.kind == "int" else float
  return [cast(dim.low), cast(dim.high)]


def _split_args(args: str) -> list[str]:
  """Top-level comma-separated pieces: `(8,16),(16,32)` → ['(8,16)', '(16,32)']."""
  pieces, depth, quote, start = [], 0, "", 0
  for i, char in enumerate(args):
    if quote:
      quote = "" if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      pieces.append(args[start:i])
      start = i + 1
  pieces.append(args[start:])
  return [p.strip() for p in pieces if p.strip()]


def _dimension(key: str, kind: str, args: list[str], text: str, default: Any) -> Dimension:
  where = f"--space '{text}'"
  if kind not in DISTRIBUTIONS:
    raise SpaceError(f"{where}: unknown distribution '{kind}'; use loguniform(LO,HI), "
                     "uniform(LO,HI), int(LO,HI) or choice(A,B,...).")
  if kind == "choice":
    choices = tuple(_read_choice(key, a, default, where) for a in args)
    if len({_choice_label(c) for c in choices}) < 2:
      raise SpaceError(f"{where}: choice needs at least two different values; for one "
                       f"value use --config.{key}=VALUE.")
    return Dimension(key, kind, text, choices=choices)
  if isinstance(default, bool) or not isinstance(default, (int, float)):
    raise SpaceError(f"{where}: {key} is {_kind_of(default)} (default {default!r}); "
                     "search it with choice(A,B,...).")
  if isinstance(default, int) and kind != "int":
    raise SpaceError(f"{where}: {key} takes whole numbers (default {default!r}); use "
                     "int(LO,HI) or choice(A,B,...).")
  if len(args) != 2:
    raise SpaceError(f"{where}: {kind} takes two numbers, LO,HI; got {len(args)}.")
  low, high = (_read_number(a, kind == "int", where) for a in args)
  if low >= high:
    raise SpaceError(f"{where}: LO must be below HI (got {low:g} >= {high:g}).")
  if kind == "loguniform" and low <= 0:
    raise SpaceError(f"{where}: loguniform needs 0 < LO (got {low:g}); use uniform(LO,HI) "
                     "for a range that reaches 0.")
  return Dimension(key, kind, text, low=low, high=high)


def _kind_of(default: Any) -> str:
  if isinstance(default, bool):
    return "true or false"
  if isinstance(default, (tuple, list)):
    return "a tuple"
  return "a string" if isinstance(default, str) else type(default).__name__


def _read_number(text: str, whole: bool, where: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise SpaceError(f"{where}: '{text}' is not a number.") from None
  if whole and value != int(value):
    raise SpaceError(f"{where}: int(LO,HI) takes whole numbers; got '{text}'.")
  return int(value) if whole else value


def _read_choice(key: str, text: str, default: Any, where: str) -> Any:
  """A choice read as the key's type (as --config.KEY=VALUE reads it)."""
  try:
    if isinstance(default, bool):
      return {"true": True, "false": False}[text.lower()]
    if isinstance(default, (int, float)):
      number = float(text)
      if isinstance(default, int) and number != int(number):
        raise ValueError(text)
      return int(number) if isinstance(default, int) else number
    if isinstance(default, str):
      literal = _literal(text)
      return literal if isinstance(literal, str) else text
    value = ast.literal_eval(text)
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  except (KeyError, ValueError, SyntaxError):
    raise SpaceError(f"{where}: choice value '{text}' does not suit {key}: expected "
                     f"{_kind_of(default) if not isinstance(default, int) else 'a whole number'}"
                     f", like the default {default!r}.") from None


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return None


def apply_values(config: ml_collections.ConfigDict, values: dict[str, Any]
                 ) -> ml_collections.ConfigDict:
  """A copy of `config` with `values` set (read as each key's type) and validated."""
  known = config_lib.flatten(config)
  result = copy.deepcopy(config)
  for key, value in values.items():
    if key not in known:
      raise config_lib.unknown_key_error(key, known, " (from the search space)")
    default = known[key]
    if isinstance(default, tuple) and isinstance(value, (tuple, list)):
      value = tuple(value)
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value,
                                                                                  bool):
      value = float(value)
    *parents, leaf = key.split(".")
    target = result
    for part in parents:
      target = target[part]
    target[leaf] = value
  config_lib.validate(result)
  return result


def check_values(config, values: dict[str, Any], where: str) -> None:
  """SpaceError unless `config` with `values` set passes the schema's checks."""
  try:
    apply_values(config, values)
  except config_lib.ConfigError as e:
    raise SpaceError(f"{where}: {e}") from None


class Space:
  """Dimensions from --space texts and/or a space file's `space(trial)` function."""

  def __init__(self, dims: Sequence[Dimension] = (), function: Callable | None = None,
               source: str = ""):
    self.dims, self.function, self.source = list(dims), function, source

  def suggest(self, trial) -> dict[str, Any]:
    values = {d.key: d.suggest(trial) for d in self.dims}
    if self.function is not None:
      extra = self.function(trial)
      if not isinstance(extra, dict):
        raise SpaceError(f"{self.source}: space(trial) returned {type(extra).__name__}; "
                         "return a dict of config key: value.")
      for key in extra:
        if key in values:
          raise SpaceError(f"{self.source}: space(trial) sets {key}, which --space "
                           "searches too; give it in one place.")
      values.update(extra)
    return values

  def check(self, config) -> None:
    """Runs the space once on a throwaway trial: its keys and values must suit `config`."""
    if self.function is None:
      return
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    try:
      values = self.suggest(trial)
    except SpaceError:
      raise
    except Exception as e:  # The user's function: say where it failed.
      raise SpaceError(f"{self.source}: space(trial) failed: {type(e).__name__}: {e}") \
          from None
    check_values(config, values, self.source)


def load_space_file(path: str) -> Callable:
  """`space(trial) -> {key: value}` from a Python file."""
  if not os.path.isfile(path):
    raise SpaceError(f"Space file '{path}' does not exist.")
  spec = importlib.util.spec_from_file_location("jaxcls_sweep_space", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  function = getattr(module, "space", None)
  if not callable(function):
    raise SpaceError(f"Space file '{path}' defines no space(trial) function; it returns "
                     "a dict of config key: value, e.g. {'optim.learning_rate': "
                     "trial.suggest_float('lr', 1e-4, 1e-1, log=True)}.")
  return function


# ------------------------------------------------------------------------------- study


def default_storage(workdir: str) -> str:
  return "sqlite:///" + os.path.abspath(os.path.join(workdir, "study.db"))


def open_study(storage_url: str, study_name: str, *, sampler=None, pruner=None,
               fingerprint: dict | None = None) -> optuna.Study:
  """The study in `storage_url`, created if new; refuses one made by another command."""
  engine = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
  with _creation_lock(storage_url), warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    # A machine that dies leaves its trial RUNNING: after `grace_period` seconds without
    # a heartbeat any worker fails it and queues its parameters again (_rerun).
    storage = optuna.storages.RDBStorage(
        storage_url, engine_kwargs=engine, heartbeat_interval=60, grace_period=300,
        heartbeat_stale_trial_callback=_rerun)
    study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                pruner=pruner, direction="maximize", load_if_exists=True)
  if fingerprint is not None:
    _check_fingerprint(study, fingerprint, storage_url)
  return study


@contextlib.contextmanager
def _creation_lock(storage_url: str):
  """Two processes opening a new SQLite file at once would both create its tables."""
  if not storage_url.startswith("sqlite:///"):
    yield
    return
  import fcntl  # POSIX; the lock is only for SQLite files.
  path = storage_url[len("sqlite:///"):]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def fingerprint(config, space: Space, space_file: str = "") -> dict:
  """What makes two sweep commands the same sweep: the config and the space."""
  digest = ""
  if space_file:
    with open(space_file, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  return {"config": json.loads(config_lib.to_json(config)),
          "space": [d.text.strip() for d in space.dims], "space_file_sha256": digest}


def _check_fingerprint(study, wanted: dict, storage_url: str) -> None:
  saved = study.user_attrs.get("sweep")
  if saved is None:
    study.set_user_attr("sweep", wanted)
    return
  if saved == wanted:
    return
  if saved["space"] != wanted["space"] or saved["space_file_sha256"] != wanted[
      "space_file_sha256"]:
    what = f"the search space ({'; '.join(saved['space']) or 'a space file'} there)"
  else:
    old = config_lib.flatten(config_lib.from_dict(saved["config"]))
    new = config_lib.flatten(config_lib.from_dict(wanted["config"]))
    what = "the config (" + ", ".join(f"{k}: {old[k]!r} there, {new[k]!r} here"
                                      for k in sorted(old) if old[k] != new[k]) + ")"
  raise JaxclsError(f"Study '{study.study_name}' in {storage_url} was started with "
                    f"another {what}; run its own command again to continue it, or use a "
                    "new --workdir (or --study-name) for a new sweep.")


def make_pruner(name: str, num_epochs: int):
  """median: MedianPruner that never judges a trial on its first epoch (see docs/sweep.md);
  hyperband: HyperbandPruner over 1..num_epochs epochs; none: NopPruner."""
  if name == "median":
    # Steps are epochs, counted from 1; MedianPruner skips steps < n_warmup_steps.
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
  if name == "hyperband":
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(num_epochs, 2),
                                          reduction_factor=3)
  if name == "none":
    return optuna.pruners.NopPruner()
  raise JaxclsError(f"Unknown pruner '{name}'; use median, hyperband or none.")


def make_sampler(seed: int | None = None):
  # constant_liar: workers sharing a study do not all sample next to the same running
  # trial; it changes nothing for one worker.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


# ---------------------------------------------------------------- counting and reruns


def retry_history(trial) -> list[int]:
  """The trials this one reruns, oldest first (Optuna's system attribute)."""
  return list(trial.system_attrs.get("retry_history", []))


def counts_towards_n(trial, interrupted: set[int]) -> bool:
  if trial.number in interrupted or trial.user_attrs.get("surplus"):
    return False
  return trial.state in _COUNTED or (trial.state == TrialState.FAIL
                                     and "diverged" in trial.user_attrs)


def _interrupted(trials) -> set[int]:
  return {number for t in trials for number in retry_history(t)}


def _frozen(study, number: int):
  return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _counted_before(study, number: int | None = None) -> int:
  """Trials that count towards N (with a number below `number`, if given)."""
  trials = study.get_trials(deepcopy=False)
  interrupted = _interrupted(trials)
  return sum(counts_towards_n(t, interrupted) for t in trials
             if number is None or t.number < number)


def _work_left(study, n_trials: int) -> bool:
  """Fewer than N trials count, or a queued one (a rerun counts already) waits to run."""
  waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
  return _counted_before(study) < n_trials or bool(waiting)


def _rerun(study, frozen) -> None:
  """Queues `frozen`'s parameters as a new trial that continues it (a FAIL trial that was
  killed or stopped): Optuna's RetryHeartbeatStaleTrialCallback, bar the owner's attrs."""
  history = retry_history(frozen) + [frozen.number]
  system_attrs = {**frozen.system_attrs, "failed_trial": history[0],
                  "retry_history": history}
  user_attrs = {k: v for k, v in frozen.user_attrs.items() if k not in _OWNER_KEYS}
  study.add_trial(optuna.create_trial(
      state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
      user_attrs=user_attrs, system_attrs=system_attrs,
      intermediate_values=frozen.intermediate_values))
  log.info("Trial %d was interrupted; its parameters are queued to run again, continuing "
           "from its last checkpoint.", frozen.number)


def _start_time(pid: int) -> str | None:
  """The process's start time (Linux /proc), so that a reused pid is not taken for it."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _owner(pid: int | None = None) -> dict:
  pid = os.getpid() if pid is None else pid
  return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid)}


def _owner_alive(attrs: dict) -> bool:
  """False only for a process of this machine that is gone (or is this one, which runs
  no trial while it looks); other machines' trials are the heartbeat's to judge."""
  if attrs.get("host") != socket.gethostname() or "pid" not in attrs:
    return True
  pid = attrs["pid"]
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return attrs.get("pid_start") is None or _start_time(pid) == attrs["pid_start"]


def fail_dead_trials(study) -> list[int]:
  """Fails and queues again the RUNNING trials whose process on this machine is gone
  (killed with SIGKILL, or the machine restarted); returns their numbers."""
  failed = []
  for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    if _owner_alive(frozen.user_attrs):
      continue
    try:
      study.tell(frozen.number, state=TrialState.FAIL)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
      continue  # Another process got there first, and queued it.
    _rerun(study, _frozen(study, frozen.number))
    failed.append(frozen.number)
  return failed


# ------------------------------------------------------------------------------- trial


def trial_dir(root: str, number: int) -> str:
  return os.path.join(root, f"trial_{number:03d}")


class _Reporter(tracking.Callback):
  """Reports each epoch's validation accuracy to the trial; prunes when told to."""

  def __init__(self, trial, inherited: dict[int, float], seconds_before: float):
    self.trial, self.values = trial, dict(inherited)
    self.start, self.seconds_before = time.monotonic(), seconds_before

  def seconds(self) -> float:
    return self.seconds_before + time.monotonic() - self.start

  def best(self) -> float:
    return max(self.values.values()) if self.values else float("nan")

  def on_epoch(self, epoch: int, metrics: dict) -> None:
    value = metrics["val_accuracy"]
    if epoch not in self.values:  # A rerun may redo an epoch its predecessor reported.
      self.values[epoch] = value
      self.trial.report(value, epoch)
    self.trial.set_user_attr("seconds", round(self.seconds(), 1))
    if self.trial.should_prune():
      raise optuna.TrialPruned(f"validation accuracy {value:.4f} after epoch {epoch}")


def _continue_from(previous: str, workdir: str) -> None:
  """Copies a killed trial's workdir (its checkpoints) so that the rerun resumes it."""
  if not os.path.isdir(previous) or os.path.exists(workdir):
    return
  partial = workdir + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  shutil.copytree(previous, partial, symlinks=True)
  os.replace(partial, workdir)


@dataclasses.dataclass
class _Objective:
  """One trial: values from the space → config → an ordinary jaxcls run."""
  config: ml_collections.ConfigDict
  root: str
  space: Space
  n_trials: int
  trial_callbacks: Callable[[Any], Sequence] | None = None
  current: int | None = None

  def __call__(self, trial) -> float:
    self.current = trial.number
    study = trial.study
    if _counted_before(study, trial.number) >= self.n_trials:
      trial.set_user_attr("surplus", True)
      raise SurplusTrial(f"{self.n_trials} trials were already under way; this one "
                         "trains nothing.")
    frozen = _frozen(study, trial.number)
    for key, value in _owner().items():
      trial.set_user_attr(key, value)
    values = self.space.suggest(trial)
    config = apply_values(self.config, values)
    trial.set_user_attr("values", {k: list(v) if isinstance(v, tuple) else v
                                   for k, v in values.items()})
    workdir, history = trial_dir(self.root, trial.number), retry_history(frozen)
    if history:
      _continue_from(trial_dir(self.root, history[-1]), workdir)
    log.info("Trial %d in %s: %s", trial.number, workdir,
             ", ".join(f"{k}={v!r}" for k, v in values.items()))
    reporter = _Reporter(trial, frozen.intermediate_values,
                         frozen.user_attrs.get("seconds", 0.0))
    extra = list(self.trial_callbacks(trial)) if self.trial_callbacks else []
    return self._train(trial, config, workdir, reporter, extra, bool(history))

  def _train(self, trial, config, workdir, reporter, extra, is_rerun: bool) -> float:
    try:
      _, summary = train.train_and_evaluate(config, workdir,
                                            resume="auto" if is_rerun else "never",
                                            callbacks=[reporter, *extra])
    except train.TrainingDivergedError as e:
      trial.set_user_attr("diverged", str(e))
      return float("nan")  # FAIL: an outcome of these parameters, counted.
    except JaxclsError as e:
      trial.set_user_attr("error", str(e))
      raise
    finally:
      trial.set_user_attr("seconds", round(reporter.seconds(), 1))
    if summary.resumed_from:
      trial.set_user_attr("resumed_from_step", summary.resumed_from)
    if summary.stop_reason.startswith("SIG"):
      raise SweepStopped(summary.stop_reason, trial.number)
    return reporter.best()


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class SweepResult:
  study: Any
  summary: str
  files: list[str]


def run_sweep(config: ml_collections.ConfigDict, workdir: str, n_trials: int,
              space: Space, *, recipe: str, overrides: Sequence[tuple[str, str]] = (),
              pruner=None, sampler=None, storage: str | None = None,
              study_name: str = STUDY_NAME, space_file: str = "",
              trial_callbacks: Callable[[Any], Sequence] | None = None) -> SweepResult:
  """Runs trials until the study holds `n_trials` that count (see `counts_towards_n`),
  then writes trials.csv, best_config.py and plots into `workdir`.

  `recipe` and `overrides` (the --config file and its --config.KEY=VALUE texts) go into
  best_config.py. `trial_callbacks(trial)` may add jaxcls.tracking callbacks to a trial's
  run. Raises SweepStopped when a signal stopped a trial (queued to continue), and the
  JaxclsError of a trial that could not start (bad data, a value the model refuses).
  """
  space.check(config)
  os.makedirs(workdir, exist_ok=True)
  study = open_study(storage or default_storage(workdir), study_name, sampler=sampler,
                     pruner=pruner or make_pruner("median", config.num_epochs),
                     fingerprint=fingerprint(config, space, space_file))
  objective = _Objective(config, workdir, space, n_trials, trial_callbacks)
  after_trial = lambda study, frozen: _after_trial(study, frozen, workdir)  # noqa: E731
  try:
    while True:
      fail_dead_trials(study)
      if not _work_left(study, n_trials):
        break
      study.optimize(objective, n_trials=1, catch=(SurplusTrial,),
                     callbacks=[after_trial], gc_after_trial=True)
  except (SweepStopped, KeyboardInterrupt):
    _requeue_stopped(study, objective.current)
    raise
  finally:
    write_trials_csv(study, os.path.join(workdir, "trials.csv"))
  files = [os.path.join(workdir, "trials.csv")]
  files += write_best_config(study, os.path.join(workdir, "best_config.py"), recipe,
                             overrides)
  notes, plots = write_plots(study, os.path.join(workdir, "plots"))
  return SweepResult(study, summary_text(study, n_trials, notes), files + plots)


def _requeue_stopped(study, number: int | None) -> None:
  if number is None:
    return
  frozen = _frozen(study, number)
  if frozen.state == TrialState.FAIL and not frozen.user_attrs.get("surplus"):
    _rerun(study, frozen)


def _after_trial(study, frozen, workdir: str) -> None:
  """One line per finished trial, and trials.csv brought up to date."""
  if frozen.user_attrs.get("surplus"):
    return
  row = trial_row(frozen, _interrupted(study.get_trials(deepcopy=False)))
  log.info("Trial %d %s: best validation accuracy %s after %s epoch(s), %s s%s",
           frozen.number, row["state"], row["best_val_accuracy"] or "-",
           row["epochs_run"] or 0, row["seconds"] or "-",
           f" ({row['note']})" if row["note"] else "")
  write_trials_csv(study, os.path.join(workdir, "trials.csv"))


# ------------------------------------------------------------------------------ outputs


def trial_row(frozen, interrupted: set[int]) -> dict:
  """One trials.csv row (without the parameter columns)."""
  values = frozen.intermediate_values
  best = max(values.values()) if values else None
  seconds = frozen.user_attrs.get("seconds")
  if seconds is None and frozen.duration is not None:
    seconds = round(frozen.duration.total_seconds(), 1)
  return {"number": frozen.number, "state": frozen.state.name,
          "best_val_accuracy": "" if best is None else f"{best:.4f}",
          "epochs_run": max(values) if values else "",
          "seconds": "" if seconds is None else seconds, "note": _note(frozen, interrupted)}


def _note(frozen, interrupted: set[int]) -> str:
  attrs, notes = frozen.user_attrs, []
  if frozen.number in interrupted:
    notes.append("interrupted; its parameters ran again")
  if retry_history(frozen):
    notes.append(f"reruns trial {retry_history(frozen)[-1]}")
    if attrs.get("resumed_from_step"):
      notes.append(f"resumed from step {attrs['resumed_from_step']}")
  for key, text in (("diverged", "diverged"), ("error", "error"), ("surplus", "not run")):
    if key in attrs:
      notes.append(f"{text}: {attrs[key]}" if key != "surplus" else
                   "not run: N trials were already under way")
  return "; ".join(notes)


def write_trials_csv(study, path: str) -> None:
  """DIR/trials.csv: one row per trial: number, state, each searched key, best
  validation accuracy, epochs run, seconds, and a note (reruns, errors)."""
  trials = study.get_trials(deepcopy=False)
  interrupted = _interrupted(trials)
  keys = sorted({k for t in trials for k in t.user_attrs.get("values", {})})
  fields = ["number", "state", *keys, "best_val_accuracy", "epochs_run", "seconds", "note"]
  temporary = f"{path}.{os.getpid()}.tmp"  # Another worker may write it too.
  with open(temporary, "w", newline="") as f:
    writer = csv.DictWriter(f, fields)
    writer.writeheader()
    for trial in trials:
      values = trial.user_attrs.get("values", {})
      writer.writerow({**trial_row(trial, interrupted),
                       **{k: _csv_value(values[k]) for k in values}})
  os.replace(temporary, path)


def _csv_value(value: Any) -> Any:
  return repr(tuple(value)) if isinstance(value, list) else value


def best_trial(study):
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


_BEST_CONFIG = '''"""The best trial of a jaxcls sweep: trial {number}, best validation accuracy {value:.4f}.

    python run_train.py --config {path} --workdir WORKDIR

The sweep's recipe with its --config overrides and the trial's values ({date}); paths in
values are as the sweep was given them (relative to the folder it ran in).
"""

import importlib.util

RECIPE = {recipe!r}
OVERRIDES = {overrides}  # --config.KEY=VALUE, as given to the sweep.
BEST = {best}  # The trial's values for the searched keys.


def get_config():
  spec = importlib.util.spec_from_file_location("jaxcls_sweep_recipe", RECIPE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  from jaxcls.cli.common import apply_overrides
  apply_overrides(config, OVERRIDES)
  for key, value in BEST.items():
    *parents, leaf = key.split(".")
    target = config
    for part in parents:
      target = target[part]
    target[leaf] = tuple(value) if isinstance(target[leaf], tuple) else value
  return config
'''


def write_best_config(study, path: str, recipe: str,
                      overrides: Sequence[tuple[str, str]]) -> list[str]:
  """DIR/best_config.py, a recipe file for the best completed trial ([] if none)."""
  best = best_trial(study)
  if best is None:
    return []
  text = _BEST_CONFIG.format(
      number=best.number, value=best.value, path=path, date=time.strftime("%Y-%m-%d"),
      recipe=os.path.abspath(recipe), overrides=_pretty(list(map(tuple, overrides))),
      best=_pretty(best.user_attrs.get("values", {})))
  temporary = f"{path}.{os.getpid()}.tmp"
  with open(temporary, "w") as f:
    f.write(text)
  os.replace(temporary, path)
  return [path]


def _pretty(value: Any) -> str:
  if isinstance(value, dict) and value:
    return "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in value.items()) + "}"
  if isinstance(value, list) and value:
    return "[\n" + "".join(f"    {v!r},\n" for v in value) + "]"
  return repr(value)


def write_plots(study, folder: str) -> tuple[list[str], list[str]]:
  """Optuna's matplotlib figures: optimization history, validation accuracy per epoch
  of each trial, parameter importances; (notes on figures not drawn, files)."""
  from optuna.visualization import matplotlib as plots
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  if not complete:
    return ["no plots: no trial has completed yet"], []
  os.makedirs(folder, exist_ok=True)
  figures = {"optimization_history": plots.plot_optimization_history,
             "intermediate_values": plots.plot_intermediate_values}
  notes = []
  varied = {k for t in complete for k in t.params
            if len({repr(u.params.get(k)) for u in complete}) > 1}
  if len(complete) >= 2 and varied:
    figures["param_importances"] = plots.plot_param_importances
  else:
    notes.append("no parameter importances: they need 2 or more completed trials with "
                 "different parameters")
  return notes, [p for p in (_plot(f, study, folder, name) for name, f in figures.items())
                 if p]


_AXIS_LABELS = {"optimization_history": ("Trial", "Best validation accuracy of the trial"),
                "intermediate_values": ("Epoch", "Validation accuracy")}


def _plot(function, study, folder: str, name: str) -> str | None:
  import matplotlib
  import matplotlib.pyplot as plt  # Optuna draws with pyplot.
  path = os.path.join(folder, name + ".png")
  # rc_context: Optuna sets pyplot's style; the caller's settings come back after.
  with warnings.catch_warnings(), matplotlib.rc_context():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    try:
      axes = function(study)
    except (ValueError, RuntimeError) as e:
      log.warning("Plot %s not drawn: %s", name, e)
      return None
    if name in _AXIS_LABELS:
      axes.set_xlabel(_AXIS_LABELS[name][0])
      axes.set_ylabel(_AXIS_LABELS[name][1])
    axes.figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(axes.figure)
  return path


def summary_text(study, n_trials: int, notes: Sequence[str] = ()) -> str:
  """The end-of-sweep report: counts by state, the best trial, its values."""
  trials = study.get_trials(deepcopy=False)
  interrupted = _interrupted(trials)
  counted = sum(counts_towards_n(t, interrupted) for t in trials)
  states = {}
  for t in trials:
    states[t.state.name] = states.get(t.state.name, 0) + 1
  lines = [f"Sweep '{study.study_name}': {counted} of {n_trials} trials ("
           + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + ")."]
  if interrupted:
    lines.append(f"Interrupted and run again: trial(s) {sorted(interrupted)}.")
  best = best_trial(study)
  if best is None:
    lines.append("No trial has completed yet.")
  else:
    lines.append(f"Best: trial {best.number}, validation accuracy {best.value:.4f} after "
                 f"{max(best.intermediate_values)} epoch(s):")
    lines += [f"  {k} = {v!r}" for k, v in best.user_attrs.get("values", {}).items()]
  lines += [f"({note})" for note in notes]
  return "\n".join(lines)

