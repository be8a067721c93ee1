"""Checkpoints that survive anything: exact resume after SIGKILL, SIGTERM, other device
counts, NaN losses, early stopping, the best checkpoint, a full or read-only disk.

Every run uses one configuration with a constant learning rate, so a run cut into pieces
with different `num_epochs` follows the same trajectory as the uninterrupted reference
run, and each piece can be compared with the reference's own checkpoints.
"""

import gc
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxcls
from numerics import assert_normwise_close, displacement, tiny_cnn_training
from conftest import tiny_config
from jaxcls import checkpoint, metric_writers, parallel, resume, steps, train
from jaxcls import workdir as workdir_lib
from jaxcls.cli import common
from jaxcls.cli import predict as predict_cli
from jaxcls.models import create_model
from jaxcls.serve import predictor as predict
from jaxcls import config as config_lib

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(jaxcls.__file__)))
STEPS_PER_EPOCH = 6  # 101 training images (shapes_dir, val_fraction 0.2) // 16.
NUM_EPOCHS = 3


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache: each run recompiles the same programs otherwise.

  JAX decides once per process whether the cache is on, so it is reset around the
  module; subprocesses get the same folder through environment variables.
  """
  from jax._src import compilation_cache
  folder = str(tmp_path_factory.mktemp("compile_cache"))
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()
  yield folder
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  compilation_cache.reset_cache()


def resume_config(shapes_dir, **overrides):
  return tiny_config(f"folder:{shapes_dir}", **{
      "num_epochs": NUM_EPOCHS, "optim.schedule": "constant",
      "checkpoint.every_steps": 4, "checkpoint.keep": 10, **overrides})


@pytest.fixture(scope="module")
def reference(shapes_dir, compile_cache, tmp_path_factory):
  """The uninterrupted run: its workdir (checkpoints 4, 6, 8, 12, 16, 18), final state."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  state, final = train.train_and_evaluate(resume_config(shapes_dir), workdir)
  assert final.stop_reason == "finished" and final.final_step == 18
  return workdir, jax.device_get(state)


def state_leaves(state) -> list[np.ndarray]:
  tree = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_states_identical(a, b):
  leaves_a, leaves_b = state_leaves(a), state_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 3
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def saved_arrays(workdir: str, step: int) -> list[np.ndarray]:
  """Every array of checkpoint `step`, restored without a target (as saved)."""
  mngr = checkpoint.manager(workdir, read_only=True)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(restored["state"]))]


def committed_steps(workdir: str) -> list[int]:
  folder = checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def copy_workdir(source: str, target: str, up_to_step: int) -> str:
  """A copy of a run's workdir as it would be had the run stopped after `up_to_step`."""
  shutil.copytree(source, target)
  for step in committed_steps(target):
    if step > up_to_step:
      shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(target), str(step)))
  return target


# A training process slowed down only in reading images (the numbers are unchanged), so
# that the test can reliably interrupt it mid-run.
DRIVER = """
import json, sys, time
from jaxcls.data import loader
_load_rows = loader._load_rows
def slow_load_rows(*args, **kwargs):
  time.sleep({delay})
  return _load_rows(*args, **kwargs)
loader._load_rows = slow_load_rows
{main}
"""

TRAIN_MAIN = """
from jaxcls import config as config_lib, train
config = config_lib.from_dict(json.load(open(sys.argv[1])))
train.train_and_evaluate(config, sys.argv[2])
"""

CLI_MAIN = """
sys.argv = ["run_train.py", "--config", sys.argv[1], "--workdir", sys.argv[2]]
from jaxcls.cli.train import main
sys.exit(main())
"""

CONFIG_FILE = """
import json
from jaxcls import config as config_lib


def get_config():
  return config_lib.from_dict(json.loads({values!r}))
"""


def start_training(tmp_path, config, workdir, *, cli: bool, delay: float = 0.3):
  """Starts a training subprocess (the library call, or the real CLI)."""
  if cli:
    config_path = tmp_path / "config_recipe.py"
    config_path.write_text(CONFIG_FILE.format(values=config_lib.to_json(config)))
  else:
    config_path = tmp_path / "config.json"
    config_path.write_text(config_lib.to_json(config))
  script = DRIVER.format(delay=delay, main=CLI_MAIN if cli else TRAIN_MAIN)
  env = {**os.environ, "PYTHONPATH": REPO,
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return subprocess.Popen([sys.executable, "-c", script, str(config_path), workdir],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def wait_for(condition, process, timeout: float = 240.0):
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      out, err = process.communicate()
      pytest.fail(f"training ended (rc {process.returncode}) before the test could "
                  f"interrupt it:\n{err[-3000:]}")
    if time.monotonic() > deadline:
      process.kill()
      pytest.fail("timed out waiting for the training subprocess")
    time.sleep(0.02)


def test_sigkill_then_rerun_is_bit_identical(shapes_dir, reference, tmp_path):
  """Killed with SIGKILL at a random moment after a checkpoint, twice; the rerun ends
  with every array of the state bit-identical to the uninterrupted run."""
  ref_workdir, ref_state = reference
  config = resume_config(shapes_dir)
  workdir = str(tmp_path / "run")
  rng = random.Random(4)
  kills = []
  for attempt in range(2):
    already = committed_steps(workdir)
    process = start_training(tmp_path, config, workdir, cli=False)
    wait_for(lambda: len(committed_steps(workdir)) > len(already), process)
    time.sleep(rng.uniform(0.0, 0.8))  # Any moment: mid-step, mid-save, mid-eval.
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    kills.append(committed_steps(workdir)[-1])
  assert kills[-1] < STEPS_PER_EPOCH * NUM_EPOCHS, "the run finished before the kill"
  state, final = train.train_and_evaluate(config, workdir)  # The same call again.
  assert final.stop_reason == "finished" and final.final_step == 18
  assert_states_identical(state, ref_state)
  # A replayed step is logged once: the rows after the checkpoint were dropped.
  train_steps = [r["step"] for r in metric_writers.read_metrics(workdir) if r["split"] == "train"]
  assert len(train_steps) == len(set(train_steps))
  assert final.last_epoch.val_accuracy == metric_writers.read_metrics(ref_workdir)[-1]["accuracy"]


def test_sigterm_saves_current_step_and_says_how_to_resume(shapes_dir, reference,
                                                           tmp_path):
  ref_workdir, ref_state = reference
  config = resume_config(shapes_dir, **{"checkpoint.every_steps": 0})  # Epoch ends only.
  workdir = str(tmp_path / "run")
  process = start_training(tmp_path, config, workdir, cli=True)
  metrics_file = os.path.join(workdir, metric_writers.METRICS_FILE)
  wait_for(lambda: os.path.exists(metrics_file) and os.path.getsize(metrics_file) > 0,
           process)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
  steps = committed_steps(workdir)
  assert len(steps) >= 1
  stopped = steps[-1]
  assert f"Stopped by SIGTERM at step {stopped};" in err
  assert "run the same command again" in err
  assert f"python run_train.py --config {tmp_path / 'config_recipe.py'}" in err
  assert "Traceback" not in err
  assert 2 <= stopped < 18
  meta = checkpoint.restore_meta(checkpoint.manager(workdir, read_only=True), stopped)
  assert meta["step"] == stopped
  # The checkpoint is the state at that step: the same as the reference's, resumable.
  if stopped in committed_steps(ref_workdir):
    assert [x.tobytes() for x in saved_arrays(workdir, stopped)] == [
        x.tobytes() for x in saved_arrays(ref_workdir, stopped)]
  state, final = train.train_and_evaluate(config, workdir)
  assert final.final_step == 18
  assert_states_identical(state, ref_state)


def test_resume_on_other_device_counts_and_back(shapes_dir, compile_cache, tmp_path):
  """Written with 8 devices, continued on 1 and then on 8 again, or on 2: same global
  batch, and the uninterrupted 8-device result up to float rounding.

  Augmentation is off here: its random draws are per device (fold_in of the device
  index), so with it on, other device counts draw other augmentations.
  """
  deterministic = resume_config(shapes_dir, **{
      "augment.flip": False, "augment.rotation": 0.0, "augment.scale": (1.0, 1.0)})
  devices = jax.local_devices()
  assert len(devices) == 8
  ref_state, ref_final = train.train_and_evaluate(deterministic, str(tmp_path / "ref"))

  def continue_run(workdir, num_epochs, devices):
    deterministic.num_epochs = num_epochs
    state, final = train.train_and_evaluate(deterministic, workdir, devices=devices)
    assert final.final_step == num_epochs * STEPS_PER_EPOCH
    return state, final

  there_and_back = copy_workdir(str(tmp_path / "ref"), str(tmp_path / "a"), up_to_step=6)
  continue_run(there_and_back, 2, devices[:1])
  results = [continue_run(there_and_back, NUM_EPOCHS, devices)]
  on_two = copy_workdir(str(tmp_path / "ref"), str(tmp_path / "b"), up_to_step=12)
  results.append(continue_run(on_two, NUM_EPOCHS, devices[:2]))
  model = create_model(deterministic.model, 2, axis_name=parallel.AXIS)
  init_rng, _ = jax.random.split(steps.root_key(deterministic.seed))
  start = jax.device_get(steps.create_train_state(deterministic, model, init_rng,
                                                  STEPS_PER_EPOCH))
  trees = lambda s: jax.device_get((s.params, s.batch_stats))
  for state, final in results:
    assert_normwise_close(displacement(trees(state), trees(start)),
                          displacement(trees(ref_state), trees(start)),
                          tiny_cnn_training(int(state.step)), "other device counts")
    assert final.last_epoch.val_accuracy == pytest.approx(
        ref_final.last_epoch.val_accuracy, abs=0.06)  # One of ~17 images may flip.


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapes_dir, reference, tmp_path):
  ref_workdir, _ = reference
  workdir = copy_workdir(ref_workdir, str(tmp_path / "run"), up_to_step=12)
  good = [x.tobytes() for x in saved_arrays(workdir, 12)]
  config = resume_config(shapes_dir, **{"optim.learning_rate": 1e30})
  with pytest.raises(train.TrainingDivergedError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  named = re.search(r"at step (\d+)\.", message)  # The step where it went bad.
  assert named and 13 <= int(named.group(1)) <= 16, message
  assert "last good checkpoint, step 12" in message and "learning_rate" in message
  assert committed_steps(workdir) == [4, 6, 8, 12]
  assert [x.tobytes() for x in saved_arrays(workdir, 12)] == good


def test_changed_structure_is_an_error_changed_schedule_a_warning(shapes_dir, reference,
                                                                  caplog):
  ref_workdir, _ = reference
  mngr = checkpoint.manager(ref_workdir, read_only=True)
  meta = checkpoint.restore_meta(mngr)
  classes, saved = meta["class_names"], config_lib.from_dict(meta["config"])
  for key, value in [("model.widths", (8, 32)), ("data.image_size", 24),
                     ("model.name", "other")]:
    changed = resume_config(shapes_dir, **{key: value})
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
      resume.check_compatible(saved, changed, classes, classes)
  with pytest.raises(config_lib.ConfigError, match="classes"):
    resume.check_compatible(saved, resume_config(shapes_dir), classes,
                            ["disc", "stripes", "triangle"])
  # Settings that change the optimizer state's structure cannot change on resume.
  for key, value in [("optim.momentum", 0.0), ("optim.grad_clip_norm", 1.0),
                     ("optim.freeze", "backbone"), ("optim.weight_decay", 0.0)]:
    changed = resume_config(shapes_dir, **{key: value})
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
      resume.check_compatible(saved, changed, classes, classes)
  caplog.set_level(logging.WARNING, logger="jaxcls")
  changed = resume_config(shapes_dir, num_epochs=5, **{"optim.learning_rate": 0.01,
                                                       "data.workers": 1})
  warned = resume.check_compatible(saved, changed, classes, classes)
  assert warned == ["num_epochs", "optim.learning_rate"]
  assert "optim.learning_rate=0.01" in caplog.text and "num_epochs=5" in caplog.text


def scripted_validation(accuracies):
  """Replaces evaluation with a fixed sequence of validation accuracies."""
  sequence = iter(accuracies)

  def fake_evaluate(*args, **kwargs):
    del args, kwargs
    return {"loss": 1.0, "accuracy": next(sequence), "count": 19}
  return fake_evaluate


def test_best_checkpoint_survives_rotation_and_early_stopping(shapes_dir, reference,
                                                             tmp_path, monkeypatch,
                                                             capsys):
  """Epoch 2 is the best; later epochs are worse; keep=1 would rotate it away."""
  ref_workdir, _ = reference
  monkeypatch.setattr(train, "_evaluate", scripted_validation([0.5, 0.8, 0.6, 0.7, 0.9]))
  config = resume_config(shapes_dir, num_epochs=5, **{
      "checkpoint.keep": 1, "train.early_stopping_patience": 2})
  workdir = str(tmp_path / "run")
  _, final = train.train_and_evaluate(config, workdir)
  assert final.stop_reason == "early_stopping"
  assert final.final_step == final.last_epoch.step == 4 * STEPS_PER_EPOCH
  assert committed_steps(workdir) == [12, 24]  # The best, and the latest.
  mngr = checkpoint.manager(workdir, read_only=True)
  assert checkpoint.best_step(mngr) == 12
  # The best checkpoint holds epoch 2's weights: the reference's step 12, bit for bit.
  assert [x.tobytes() for x in saved_arrays(workdir, 12)] == [
      x.tobytes() for x in saved_arrays(ref_workdir, 12)]

  predictor = predict.Predictor.from_workdir(workdir)
  assert predictor.step == 12
  ref_params = saved_arrays(ref_workdir, 12)
  params = [np.asarray(x) for x in jax.tree.leaves(predictor.variables["params"])]
  assert any(p.shape == r.shape and p.tobytes() == r.tobytes()
             for p in params for r in ref_params if p.size > 8)
  assert predict.Predictor.from_workdir(workdir, step=24).step == 24
  with pytest.raises(ValueError, match="No checkpoint at step 13"):
    predict.Predictor.from_workdir(workdir, step=13)
  image = os.path.join(shapes_dir, "disc", sorted(os.listdir(
      os.path.join(shapes_dir, "disc")))[0])
  assert predict_cli.main(["--workdir", workdir, image]) == 0
  err = capsys.readouterr().err
  assert "Loaded the best checkpoint: step 12 (epoch 2, val accuracy 0.8000)" in err
  predict_cli.main(["--workdir", workdir, "--step", "24", image])
  assert "Loaded the requested checkpoint: step 24" in capsys.readouterr().err

  # The same command again does not train past the early stop.
  _, again = train.train_and_evaluate(config, workdir)
  assert again.stop_reason == "already_stopped_early" and again.final_step == 24
  assert committed_steps(workdir) == [12, 24]


def scripted_validation_by_weights(raw, average):
  """Replaces evaluation: the weights get `raw`'s accuracies in turn, their average
  (evaluated as a state whose params are its `ema`'s) `average`'s."""
  sequences = {"raw": iter(raw), "ema": iter(average)}

  def fake_evaluate(p_eval_step, replicated_state, *args, **kwargs):
    del p_eval_step, args, kwargs
    ema = replicated_state.ema
    kind = "ema" if ema is not None and replicated_state.params is ema["params"] else "raw"
    return {"loss": 1.0, "accuracy": next(sequences[kind]), "count": 19}
  return fake_evaluate


def test_each_kind_of_weights_keeps_its_own_best_checkpoint(shapes_dir, tmp_path,
                                                            monkeypatch):
  """The weights are best at epoch 2, their average at epoch 3: `weights="ema"` loads
  epoch 3's average, the default epoch 2's weights; keep=1 would rotate both away, and
  early stopping waits until neither has improved for its patience."""
  monkeypatch.setattr(train, "_evaluate", scripted_validation_by_weights(
      raw=[0.5, 0.8, 0.6, 0.7, 0.9], average=[0.4, 0.7, 0.9, 0.85, 0.95]))
  config = resume_config(shapes_dir, num_epochs=5, **{
      "optim.ema_decay": 0.9, "checkpoint.keep": 1, "train.early_stopping_patience": 1})
  workdir = str(tmp_path / "run")
  _, final = train.train_and_evaluate(config, workdir)
  # Epoch 3: the weights did not improve, their average did; epoch 4: neither.
  assert final.stop_reason == "early_stopping"
  assert final.final_step == 4 * STEPS_PER_EPOCH
  assert committed_steps(workdir) == [12, 18, 24]  # Best weights, best average, latest.
  mngr = checkpoint.manager(workdir, read_only=True)
  assert (checkpoint.best_step(mngr), checkpoint.best_step(mngr, "ema")) == (12, 18)
  progress = workdir_lib.read_meta(mngr).progress  # The latest checkpoint's record.
  mngr.close()
  assert (progress.best, progress.best_ema) == (workdir_lib.Best(0.8, 2, 12),
                                                workdir_lib.Best(0.9, 3, 18))

  average = predict.Predictor.from_workdir(workdir, weights="ema")
  assert average.step == 18
  assert average.checkpoint_description == (
      "the best checkpoint: step 18 (epoch 3, val accuracy 0.9000), its weight average")
  saved = saved_arrays(workdir, 18)
  ema_leaves = [np.asarray(x) for x in jax.tree.leaves(average.variables)]
  assert all(any(x.shape == y.shape and x.tobytes() == y.tobytes() for y in saved)
             for x in ema_leaves)
  raw = predict.Predictor.from_workdir(workdir)
  assert raw.step == 12
  assert raw.checkpoint_description == (
      "the best checkpoint: step 12 (epoch 2, val accuracy 0.8000)")
  # The same command again does not train past the early stop.
  _, again = train.train_and_evaluate(config, workdir)
  assert again.stop_reason == "already_stopped_early" and again.final_step == 24


def can_mount_tmpfs(path) -> bool:
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0:
    return False
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)],
                        capture_output=True)
  return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
  """A 2 MB tmpfs (needs root and mount rights, as in containers and CI runners)."""
  mount_point = tmp_path / "disk"
  if not can_mount_tmpfs(mount_point):
    pytest.skip("needs root with the right to mount a tmpfs")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_full_disk_is_a_clear_error_and_checkpoints_survive(shapes_dir, reference,
                                                           small_disk, monkeypatch):
  ref_workdir, ref_state = reference
  # What the programs' stderr would get after their error line besides: nothing.
  leaked = []
  monkeypatch.setattr(sys, "unraisablehook", leaked.append)
  common.drop_closed_loop_callbacks()
  workdir = copy_workdir(ref_workdir, str(small_disk / "run"), up_to_step=12)
  good = [x.tobytes() for x in saved_arrays(workdir, 12)]
  # Room for the logs of a step or two, not for a checkpoint (about 160 KB).
  stats = os.statvfs(small_disk)
  filler = small_disk / "filler"
  filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 60_000))
  config = resume_config(shapes_dir, **{"checkpoint.every_steps": 1})
  with pytest.raises(train.WorkdirError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert "No space left on device" in message
  assert "intact (latest complete: step 12)" in message
  assert committed_steps(workdir) == [4, 6, 8, 12]
  assert [x.tobytes() for x in saved_arrays(workdir, 12)] == good
  # Space freed: the same call resumes and ends where the reference ended.
  filler.unlink()
  state, final = train.train_and_evaluate(config, workdir)
  assert final.final_step == 18
  assert_states_identical(state, ref_state)
  gc.collect()
  assert [f"{type(u.exc_value).__name__}: {u.exc_value}" for u in leaked] == []


def test_unwritable_workdir_is_a_clear_error_and_checkpoints_survive(
    shapes_dir, reference, tmp_path):
  """Read-only for everyone, root included: a read-only remount (root) or chmod."""
  ref_workdir, _ = reference
  if os.geteuid() == 0:
    if not can_mount_tmpfs(tmp_path / "disk"):
      pytest.skip("root without mount rights: chmod does not stop root from writing")
    workdir = copy_workdir(ref_workdir, str(tmp_path / "disk" / "run"), up_to_step=12)
    subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "disk")], check=True)
  else:
    workdir = copy_workdir(ref_workdir, str(tmp_path / "run"), up_to_step=12)
    for folder, _, _ in os.walk(workdir):
      os.chmod(folder, 0o555)
  good = [x.tobytes() for x in saved_arrays(workdir, 12)]
  try:
    with pytest.raises(train.WorkdirError, match="Cannot write to workdir"):
      train.train_and_evaluate(resume_config(shapes_dir), workdir)
    assert committed_steps(workdir) == [4, 6, 8, 12]
    assert [x.tobytes() for x in saved_arrays(workdir, 12)] == good
  finally:
    if os.geteuid() == 0:
      subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=True)
    else:
      for folder, _, _ in os.walk(workdir):
        os.chmod(folder, 0o755)


def test_interrupted_metrics_line_and_replayed_rows_are_dropped(tmp_path):
  rows = [{"step": s, "split": "train", "loss": 1.0} for s in (2, 4, 6, 8)]
  path = tmp_path / metric_writers.METRICS_FILE
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "spl')
  assert metric_writers.drop_rows_after(str(tmp_path), 4) == 3
  assert [r["step"] for r in metric_writers.read_metrics(str(tmp_path))] == [2, 4]


def test_ranking_prefers_accuracy_then_earlier_step():
  ranked = sorted([{"step": 4}, {"step": 12, "val_accuracy": 0.8},
                   {"step": 6, "val_accuracy": 0.8}, {"step": 18, "val_accuracy": 0.5}],
                  key=checkpoint.ranking_key)
  assert [m["step"] for m in ranked] == [4, 18, 12, 6]


def test_half_written_checkpoint_is_invisible_and_cleaned_up(reference, tmp_path):
  """What a crash mid-save leaves (a temporary folder) is never the latest checkpoint."""
  ref_workdir, _ = reference
  workdir = copy_workdir(ref_workdir, str(tmp_path / "run"), up_to_step=12)
  partial = os.path.join(checkpoint.checkpoint_dir(workdir),
                         "16.orbax-checkpoint-tmp")
  shutil.copytree(os.path.join(checkpoint.checkpoint_dir(ref_workdir), "16"), partial)
  for root, _, files in os.walk(partial):
    for name in files[:1]:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(3)
  reader = checkpoint.manager(workdir, read_only=True)
  assert reader.latest_step() == 12 and reader.all_steps() == [4, 6, 8, 12]
  assert predict.Predictor.from_workdir(workdir, step=12).step == 12
  writer = checkpoint.manager(workdir, keep=10)  # What training opens on resume.
  assert not os.path.exists(partial)  # Removed before manager() returns.
  writer.close()
  assert committed_steps(workdir) == [4, 6, 8, 12]
