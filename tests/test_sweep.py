"""jaxcls-sweep: the space syntax and its errors, pruning, the files it writes, a sweep
killed with SIGKILL that continues to N trials, and two processes sharing one study.

Trials train the demo recipe shrunk to seconds (16 px, 48 generated images, 2 epochs of
2 steps). The searched key is `seed`: it changes no compiled program, so trials after
the first reuse JAX's compilation cache.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from blocked_imports import run_blocked
from conftest import ROOT
from jaxcls import config as config_lib
from jaxcls import sweep, tracking
from jaxcls.cli import common
from jaxcls.cli import sweep as sweep_cli

DEMO = os.path.join(ROOT, "configs", "demo.py")
# Steps per epoch: 48 images, 20% held out by a hash of the path: 35 to 40 train, 2 steps.
FAST = ["--config.data.image_size=16", "--config.model.widths=(8,16)",
        "--config.data.generated_per_class=24", "--config.batch_size=16",
        "--config.num_epochs=2", "--config.train.progress_bar=false",
        "--config.train.log_images=0", "--config.checkpoint.async_save=false"]
SEED_SPACE = ["--space", "seed=int(0,1000000)"]


def _args(workdir, trials, *extra):
  return ["--config", DEMO, "--workdir", str(workdir), "--trials", str(trials),
          *SEED_SPACE, *FAST, *extra]


def _study(workdir):
  return optuna.load_study(study_name=sweep.STUDY_NAME,
                           storage=sweep.default_storage(str(workdir)))


def _rows(workdir):
  with open(os.path.join(workdir, "trials.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _val_accuracies(trial_workdir):
  with open(os.path.join(trial_workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["epoch"]: r["accuracy"] for r in rows if r["split"] == "val"}


@pytest.fixture
def main(monkeypatch):
  """The program's main in this process (no allocator re-execution of pytest)."""
  monkeypatch.setenv("JAXCLS_ALLOCATOR_DEFAULTS", "0")
  return sweep_cli.main


def _demo_config():
  return common.load_config(DEMO, common.split_overrides(FAST)[1])


# ------------------------------------------------------------------------------ space


def test_space_flags_parse_into_optuna_distributions_of_the_keys_types():
  dims = sweep.parse_space(["optim.learning_rate=loguniform(1e-4, 0.1)",
                            "model.dropout=uniform(0,0.5)", "batch_size=int(8,64)",
                            "model.widths=choice((8,16),(16,32,64))",
                            "augment.flip=choice(true,false)",
                            "optim.name=choice(sgd,'adamw')"], _demo_config())
  assert [(d.key, d.kind, d.low, d.high, d.choices) for d in dims] == [
      ("optim.learning_rate", "loguniform", 1e-4, 0.1, ()),
      ("model.dropout", "uniform", 0.0, 0.5, ()),
      ("batch_size", "int", 8, 64, ()),
      ("model.widths", "choice", 0, 0, ((8, 16), (16, 32, 64))),
      ("augment.flip", "choice", 0, 0, (True, False)),
      ("optim.name", "choice", 0, 0, ("sgd", "adamw"))]
  # Optuna stores a tuple choice as its text; the trial gets the tuple back.
  fixed = optuna.trial.FixedTrial({"model.widths": "(16, 32, 64)"})
  assert dims[3].suggest(fixed) == (16, 32, 64)
  fixed = optuna.trial.FixedTrial({"optim.learning_rate": 0.003})
  assert dims[0].suggest(fixed) == 0.003


BAD_SPACES = [
    ("optim.lr=loguniform(1e-4,1e-1)",
     "error: Unknown config key 'optim.lr' (--space optim.lr=loguniform(1e-4,1e-1)). Did "
     "you mean optim.learning_rate"),
    ("optim.learning_rate=logunif(1e-4,1e-1)",
     "error: --space 'optim.learning_rate=logunif(1e-4,1e-1)': unknown distribution "
     "'logunif'; use loguniform(LO,HI), uniform(LO,HI), int(LO,HI) or choice(A,B,...)."),
    ("optim.learning_rate=uniform(0.1,0.01)",
     "error: --space 'optim.learning_rate=uniform(0.1,0.01)': LO must be below HI (got "
     "0.1 >= 0.01)."),
    ("optim.learning_rate=loguniform(0,0.1)",
     "error: --space 'optim.learning_rate=loguniform(0,0.1)': loguniform needs 0 < LO "
     "(got 0); use uniform(LO,HI) for a range that reaches 0."),
    ("batch_size=choice(16,big)",
     "error: --space 'batch_size=choice(16,big)': choice value 'big' does not suit "
     "batch_size: expected a whole number, like the default 16."),
    ("batch_size=uniform(8,64)",
     "error: --space 'batch_size=uniform(8,64)': batch_size takes whole numbers (default "
     "16); use int(LO,HI) or choice(A,B,...)."),
    ("augment.flip=uniform(0,1)",
     "error: --space 'augment.flip=uniform(0,1)': augment.flip is true or false (default "
     "True); search it with choice(A,B,...)."),
    ("model.dropout=uniform(0,1)",
     "error: --space 'model.dropout=uniform(0,1)': Config key 'model.dropout' is 1.0; use "
     "a rate in [0, 1)."),
    ("optim.schedule=choice(cosine,linear)",
     "error: --space 'optim.schedule=choice(cosine,linear)': Config key 'optim.schedule' "
     "is 'linear'; use 'constant', 'cosine' or 'step'."),
    ("learning_rate", "error: --space 'learning_rate': expected KEY=DISTRIBUTION(...)"),
]


@pytest.mark.parametrize("space, message", BAD_SPACES)
def test_a_bad_space_is_one_error_line_before_anything_starts(main, capsys, tmp_path,
                                                                space, message):
  workdir = tmp_path / "sweep"
  code = main(["--config", DEMO, "--workdir", str(workdir), "--trials", "2", "--space",
               space, *FAST])
  err = capsys.readouterr().err
  assert code == 2
  assert len(err.strip().splitlines()) == 1 and err.startswith(message), err
  assert not workdir.exists()  # No study, no trial folder.


def test_a_space_file_is_checked_like_the_flags(main, capsys, tmp_path):
  space_file = tmp_path / "space.py"
  space_file.write_text("def space(trial):\n"
                        "  return {'optim.lr': trial.suggest_float('lr', 1e-3, 0.1)}\n")
  workdir = tmp_path / "sweep"
  code = main(["--config", DEMO, "--workdir", str(workdir), "--trials", "2",
               "--space-file", str(space_file), *FAST])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert err.startswith(f"error: --space-file {space_file}: Unknown config key 'optim.lr' "
                        "(from the search space). Did you mean optim.learning_rate"), err
  assert not workdir.exists()


def test_a_searched_key_may_not_also_be_overridden(main, capsys, tmp_path):
  code = main(_args(tmp_path / "sweep", 2, "--config.seed=3"))
  assert code == 2
  assert capsys.readouterr().err == ("error: seed is both set (--config.seed) and searched "
                                     "(--space 'seed=int(0,1000000)'); drop one.\n")


def test_the_median_pruner_never_judges_the_first_epoch():
  """Steps are epochs from 1; MedianPruner judges a step only if it is >= n_warmup_steps."""
  study = optuna.create_study(direction="maximize",
                              pruner=sweep.make_pruner("median", num_epochs=10))
  for value in (0.9, 0.9, 0.9, 0.9, 0.9):
    trial = study.ask()
    trial.report(value, 1)
    trial.report(value, 2)
    study.tell(trial, value)
  poor = study.ask()
  poor.report(0.1, 1)
  assert not poor.should_prune()
  poor.report(0.1, 2)
  assert poor.should_prune()


# ------------------------------------------------------------------------------ sweeps


@pytest.mark.slow
def test_a_sweep_writes_its_files_and_continues_without_rerunning(main, capsys, tmp_path):
  workdir = tmp_path / "sweep"
  assert main(_args(workdir, 2)) == 0
  out = capsys.readouterr().out
  study = _study(workdir)
  trials = study.get_trials()
  assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
  rows = _rows(workdir)
  assert list(rows[0]) == ["number", "state", "seed", "best_val_accuracy", "epochs_run",
                           "seconds", "note"]
  for row, trial in zip(rows, trials):
    accuracies = _val_accuracies(workdir / f"trial_{trial.number:03d}")
    assert sorted(accuracies) == [1, 2]  # jaxcls's own record of the run.
    assert trial.intermediate_values == accuracies
    assert trial.value == max(accuracies.values())
    assert row == {"number": str(trial.number), "state": "COMPLETE",
                   "seed": str(trial.params["seed"]),
                   "best_val_accuracy": f"{trial.value:.4f}", "epochs_run": "2",
                   "seconds": row["seconds"], "note": ""}
    assert float(row["seconds"]) > 0
  best = max(trials, key=lambda t: (t.value, -t.number))
  config = common.load_config(str(workdir / "best_config.py"))
  config_lib.validate(config)
  assert config.seed == best.params["seed"]
  assert (config.data.image_size, tuple(config.model.widths), config.num_epochs) == (
      16, (8, 16), 2)  # The sweep's overrides.
  assert f"Best: trial {best.number}, validation accuracy {best.value:.4f}" in out
  assert "Sweep 'jaxcls-sweep': 2 of 2 trials (2 complete)." in out
  for name in ("optimization_history", "intermediate_values", "param_importances"):
    assert (workdir / "plots" / f"{name}.png").stat().st_size > 0, name

  before = {t.number: (t.datetime_start, os.stat(
      workdir / f"trial_{t.number:03d}" / "metrics.jsonl").st_mtime_ns) for t in trials}
  assert main(_args(workdir, 2)) == 0  # Done already: nothing runs.
  assert main(_args(workdir, 3)) == 0  # One more.
  trials = _study(workdir).get_trials()
  assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
  assert {t.number: (t.datetime_start, os.stat(
      workdir / f"trial_{t.number:03d}" / "metrics.jsonl").st_mtime_ns)
          for t in trials[:2]} == before
  assert len(_rows(workdir)) == 3


@pytest.mark.slow
def test_unpromising_trials_are_pruned(tmp_path):
  """A pruner told that every value is below its bar prunes each trial after epoch 1:
  the report → should_prune → TrialPruned path through a jaxcls run."""
  workdir = str(tmp_path / "sweep")
  config = _demo_config()
  space = sweep.Space(sweep.parse_space(["seed=int(0,1000000)"], config))
  result = sweep.run_sweep(config, workdir, 2, space, recipe=DEMO,
                           pruner=optuna.pruners.ThresholdPruner(lower=1.5))
  trials = result.study.get_trials()
  assert [t.state for t in trials] == [TrialState.PRUNED] * 2
  assert [sorted(t.intermediate_values) for t in trials] == [[1], [1]]
  assert [r["state"] for r in _rows(workdir)] == ["PRUNED"] * 2
  assert [r["epochs_run"] for r in _rows(workdir)] == ["1"] * 2
  assert not os.path.exists(os.path.join(workdir, "best_config.py"))  # None completed.
  assert "No trial has completed yet." in result.summary
  assert "2 of 2 trials (2 pruned)" in result.summary


class _TermAfterEpoch1(tracking.Callback):
  """Sends this process SIGTERM during epoch 1's report (as `kill` would)."""

  def on_epoch(self, epoch, metrics):
    if epoch == 1:
      os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_signal_in_a_trial_stops_the_sweep_and_the_trial_continues_next_time(tmp_path):
  """jaxcls stops at the next log interval with a checkpoint; the sweep queues the
  trial's parameters, and the next run resumes that checkpoint."""
  workdir = str(tmp_path / "sweep")
  config = _demo_config()
  config.num_epochs = 3
  space = sweep.Space(sweep.parse_space(["seed=int(0,1000000)"], config))
  with pytest.raises(sweep.SweepStopped) as stopped:
    sweep.run_sweep(config, workdir, 1, space, recipe=DEMO,
                    trial_callbacks=lambda trial: [_TermAfterEpoch1()])
  assert (stopped.value.signal_name, stopped.value.trial_number) == ("SIGTERM", 0)
  stopped_trial, queued = _study(workdir).get_trials()
  assert (stopped_trial.state, queued.state) == (TrialState.FAIL, TrialState.WAITING)
  assert queued.params == stopped_trial.params
  (saved_step,) = [int(n) for n in os.listdir(os.path.join(workdir, "trial_000",
                                                           "checkpoints"))
                   if n.isdigit() and int(n) > 2]  # Where the signal stopped it.
  result = sweep.run_sweep(config, workdir, 1, space, recipe=DEMO)
  assert [t.state for t in result.study.get_trials()] == [TrialState.FAIL,
                                                          TrialState.COMPLETE]
  rerun = result.study.get_trials()[1]
  assert rerun.user_attrs["resumed_from_step"] == saved_step
  assert sorted(rerun.intermediate_values) == [1, 2, 3]


HOLD = """
import os, sys, time
from jaxcls import tracking
from jaxcls.cli import sweep

class Hold(tracking.Callback):
  '''Trial 1 waits to be killed after reporting epoch 2, before saving that epoch.'''
  def __init__(self, trial):
    self.trial = trial
  def on_epoch(self, epoch, metrics):
    if self.trial.number == 1 and epoch == 2:
      open(sys.argv[1], "w").close()
      time.sleep(600)

sys.exit(sweep.main(sys.argv[2:], trial_callbacks=lambda trial: [Hold(trial)]))
"""


def _wait_for(path, process, deadline_s=600):
  deadline = time.monotonic() + deadline_s
  while not os.path.exists(path):
    assert process.poll() is None, "the sweep ended before trial 1 held"
    assert time.monotonic() < deadline, "trial 1 never held"
    time.sleep(0.2)


@pytest.mark.slow
def test_a_sigkilled_sweep_continues_to_n_trials_without_rerunning_a_finished_one(
    tmp_path):
  workdir, held = tmp_path / "sweep", str(tmp_path / "held")
  (tmp_path / "hold.py").write_text(HOLD)
  env = {**os.environ, "PYTHONPATH": ROOT}
  with open(tmp_path / "first.log", "w") as log:
    first = subprocess.Popen([sys.executable, str(tmp_path / "hold.py"), held,
                              *_args(workdir, 3)], stdout=log, stderr=log, env=env, cwd=ROOT)
    try:
      _wait_for(held, first)
    finally:
      first.send_signal(signal.SIGKILL)
      first.wait()
  study = _study(workdir)
  finished, killed = study.get_trials()
  assert (finished.state, killed.state) == (TrialState.COMPLETE, TrialState.RUNNING)
  first_run = workdir / "trial_000" / "metrics.jsonl"
  first_bytes, first_mtime = first_run.read_bytes(), first_run.stat().st_mtime_ns
  (saved_step,) = [int(n) for n in os.listdir(workdir / "trial_001" / "checkpoints")
                   if n.isdigit()]  # Epoch 1's; epoch 2's was never saved.

  again = subprocess.run([sys.executable, "-m", "jaxcls.cli.sweep", *_args(workdir, 3)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  assert again.returncode == 0, again.stderr
  trials = _study(workdir).get_trials()
  assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                       TrialState.COMPLETE, TrialState.COMPLETE]
  assert (trials[0].datetime_start, trials[0].datetime_complete) == (
      finished.datetime_start, finished.datetime_complete)  # Not run again.
  assert first_run.read_bytes() == first_bytes and first_run.stat().st_mtime_ns == first_mtime
  rerun = trials[2]
  assert rerun.params == killed.params and rerun.system_attrs["retry_history"] == [1]
  assert rerun.user_attrs["resumed_from_step"] == saved_step > 0
  # Epoch 2 was reported by the killed trial and trained again after the resume: jaxcls
  # resumes bit for bit, so its own record equals the reported value exactly.
  assert _val_accuracies(workdir / "trial_002") == rerun.intermediate_values
  assert rerun.intermediate_values == killed.intermediate_values
  notes = [r["note"] for r in _rows(workdir)]
  assert notes == ["", "interrupted; its parameters ran again",
                   f"reruns trial 1; resumed from step {saved_step}", ""]
  assert "Sweep 'jaxcls-sweep': 3 of 3 trials (3 complete, 1 fail)." in again.stdout


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tmp_path):
  workdir = tmp_path / "sweep"
  program = os.path.join(os.path.dirname(sys.executable), "jaxcls-sweep")
  env = {**os.environ, "PYTHONPATH": ROOT}
  logs = [tmp_path / "a.log", tmp_path / "b.log"]
  processes = []
  for path in logs:
    with open(path, "w") as log:
      processes.append(subprocess.Popen([program, *_args(workdir, 3)], stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=ROOT))
  assert [p.wait(timeout=900) for p in processes] == [0, 0], [p.read_text() for p in logs]
  trials = _study(workdir).get_trials()
  ran = [t for t in trials if not t.user_attrs.get("surplus")]
  assert [t.state for t in ran] == [TrialState.COMPLETE] * 3
  started = [int(n) for path in logs
             for n in re.findall(r"Trial (\d+) in ", path.read_text())]
  assert sorted(started) == [t.number for t in ran]  # Each trial ran once, in one process.
  assert sorted(n for n in os.listdir(workdir) if n.startswith("trial_")) == [
      f"trial_{t.number:03d}" for t in ran]


@pytest.mark.slow
def test_jaxcls_needs_no_optuna_and_the_sweep_says_how_to_get_it(tmp_path):
  program = tmp_path / "program.py"
  program.write_text("import jaxcls.train, jaxcls.tracking, jaxcls.cli.sweep\n"
                     "jaxcls.cli.sweep.cli()\n")
  code, _, stderr = run_blocked(str(program), _args(tmp_path / "sweep", 2), ("optuna",),
                                ROOT)
  assert code == 2
  assert stderr == ("error: jaxcls-sweep needs Optuna, which cannot be imported (optuna "
                    "is blocked): pip install 'jaxcls[sweep]'.\n")
  assert not (tmp_path / "sweep").exists()
