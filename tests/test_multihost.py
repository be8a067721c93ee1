"""Multi-process training on one machine: JAX's distributed runtime, gloo on 127.0.0.1.

2 processes × 2 CPU devices must train exactly like 1 process × 4 devices: the same
global batch reaches the same device positions (process 0 holds devices 0-1, process 1
devices 2-3), so even augmentation and dropout draw the same numbers (their keys are
folded with the global `axis_index`). Every run is the real command line in
subprocesses that share a compilation cache, so later runs skip most compiling.
"""

import collections
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_config
from numerics import assert_normwise_close, displacement, tiny_cnn_training
from jaxcls import checkpoint, distributed, metric_writers, parallel, steps
from jaxcls.data import loader, sources
from jaxcls.models import create_model

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# For each batch of runs started together; a 2-core machine shared with other jobs has
# needed ~2.5 minutes for the slowest.
TIMEOUT_S = 480


# ---------------------------------------------------------------------------------------
# Launching processes


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def subprocess_env(devices: int, cache_dir: str) -> dict:
  """This environment without the tests' 8-device XLA flag, with `devices` CPU devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  paths = [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu",
             JAX_NUM_CPU_DEVICES=str(devices), PYTHONPATH=os.pathsep.join(paths))
  # Later runs reuse earlier runs' programs (on process 0: JAX writes entries from the
  # first process only, and process 1 compiled its own here). conftest.py may have
  # chosen a cache for the whole session already.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


class Run:
  """One training command run as `processes` processes of `devices` CPU devices each.

  The processes are started here and, with `finish`, waited for and killed if they
  outlive the timeout; a run with one process gets no distributed flags at all.
  """

  def __init__(self, config_file: str, workdir: str, cache_dir: str, processes: int,
               devices: int):
    self.workdir = workdir
    command = [sys.executable, "-m", "jaxcls.cli.train", f"--config={config_file}",
               f"--workdir={workdir}"]
    if processes > 1:
      command += [f"--coordinator_address=127.0.0.1:{free_port()}",
                  f"--num_processes={processes}"]
    self.logs, self.procs = [], []
    for process_id in range(processes):
      log = open(f"{workdir}.process{process_id}.log", "w+")
      self.logs.append(log)
      extra = [f"--process_id={process_id}"] if processes > 1 else []
      self.procs.append(subprocess.Popen(
          command + extra, cwd=ROOT, env=subprocess_env(devices, cache_dir),
          stdout=log, stderr=subprocess.STDOUT))

  def finish(self, deadline: float, exit_code: int = 0) -> list[str]:
    """Waits until `deadline` (time.monotonic()); returns each process's output."""
    try:
      for proc in self.procs:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
    finally:
      for proc in self.procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    outputs = []
    for log in self.logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
    codes = [proc.returncode for proc in self.procs]
    tails = "\n".join(f"--- process {i} ---\n{text[-4000:]}"
                      for i, text in enumerate(outputs))
    assert codes == [exit_code] * len(codes), f"{self.workdir}: exit codes {codes}\n{tails}"
    return outputs


def run_together(*runs: Run) -> list[list[str]]:
  deadline = time.monotonic() + TIMEOUT_S
  try:
    return [run.finish(deadline) for run in runs]
  finally:
    for run in runs:  # If one failed, stop the others too.
      for proc in run.procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()


# ---------------------------------------------------------------------------------------
# The runs, shared by the tests below


def multihost_config(shapes_dir: str, num_epochs: int = 1):
  # Default augmentation (flip, rotation, zoom) and dropout stay on: they must match.
  return tiny_config(f"folder:{shapes_dir}", num_epochs=num_epochs,
                     **{"model.dropout": 0.1, "data.workers": 1})


def write_config_file(directory: str, config) -> str:
  """A recipe file that rebuilds `config` exactly, for the command line."""
  values = os.path.join(directory, f"config_{config.num_epochs}.json")
  with open(values, "w") as f:
    json.dump(config.to_dict(), f)
  path = os.path.join(directory, f"config_{config.num_epochs}.py")
  with open(path, "w") as f:
    f.write("import json\nfrom jaxcls import config as config_lib\n\n"
            "def get_config():\n"
            f"  with open({values!r}) as f:\n"
            "    return config_lib.from_dict(json.load(f))\n")
  return path


class Runs:
  """Four runs, made once per module and compared by the tests.

  single: 1 process × 4 devices, 1 epoch.   multi: 2 processes × 2 devices, 1 epoch.
  Then each resumes the other's checkpoint for a second epoch:
  multi_then_single: `multi`'s checkpoint continued by 1 process × 4 devices;
  single_then_multi: `single`'s checkpoint continued by 2 processes × 2 devices.
  """

  def __init__(self, root: str, shapes_dir: str):
    self.root = root
    cache = os.path.join(root, "compile_cache")
    self.config = multihost_config(shapes_dir)
    self.dataset = sources.build_dataset(self.config.data, self.config.seed)
    self.steps_per_epoch = len(self.dataset.train) // self.config.batch_size
    one_epoch = write_config_file(root, self.config)
    two_epochs = write_config_file(root, multihost_config(shapes_dir, num_epochs=2))
    self.single, self.multi = (os.path.join(root, name) for name in ("single", "multi"))
    self.single_output, self.multi_output = run_together(
        Run(one_epoch, self.single, cache, processes=1, devices=4),
        Run(one_epoch, self.multi, cache, processes=2, devices=2))
    self.multi_then_single = os.path.join(root, "multi_then_single")
    self.single_then_multi = os.path.join(root, "single_then_multi")
    shutil.copytree(self.multi, self.multi_then_single)
    shutil.copytree(self.single, self.single_then_multi)
    self.multi_then_single_output, self.single_then_multi_output = run_together(
        Run(two_epochs, self.multi_then_single, cache, processes=1, devices=4),
        Run(two_epochs, self.single_then_multi, cache, processes=2, devices=2))
    model = create_model(self.config.model, len(self.dataset.class_names),
                         axis_name=parallel.AXIS)
    # Shapes and dtypes only: nothing is compiled to describe what to restore.
    self.target = jax.eval_shape(lambda: steps.create_train_state(
        self.config, model, jax.random.key(0), self.steps_per_epoch))
    # Where every run started: training's own initialization from the seed.
    init_rng, _ = jax.random.split(steps.root_key(self.config.seed))
    self.start = jax.device_get(steps.create_train_state(
        self.config, model, init_rng, self.steps_per_epoch))

  def state(self, workdir: str, step: int | None = None):
    mngr = checkpoint.manager(workdir, read_only=True)
    try:
      step = mngr.latest_step() if step is None else step
      return step, jax.device_get(checkpoint.restore_state(mngr, step, self.target))
    finally:
      mngr.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_dir):
  return Runs(str(tmp_path_factory.mktemp("multihost")), shapes_dir)


def assert_trained_alike(actual, expected, start, steps: int, what: str):
  """Two runs of `steps` steps whose collectives add in other orders (gloo across
  processes, XLA's in one) moved the state alike, to float32 rounding."""
  assert_normwise_close(displacement(actual, start), displacement(expected, start),
                        tiny_cnn_training(steps), what)


def rows(workdir: str, split: str) -> list[dict]:
  return [r for r in metric_writers.read_metrics(workdir) if r["split"] == split]


# ---------------------------------------------------------------------------------------
# Two processes against one


def test_two_processes_end_with_the_parameters_of_one(runs):
  step, single = runs.state(runs.single)
  multi_step, multi = runs.state(runs.multi)
  assert step == multi_step == runs.steps_per_epoch
  start = runs.start
  assert_trained_alike((multi.params, multi.batch_stats), (single.params, single.batch_stats),
                       (start.params, start.batch_stats), step, "2 processes against 1")
  assert_normwise_close(multi.opt_state, single.opt_state, tiny_cnn_training(step),
                        "momentum")
  # The momentum holds the gradients applied: far from zero, so equality means something.
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(single.opt_state)) > 1e-2


def test_training_losses_agree_step_by_step(runs):
  single, multi = rows(runs.single, "train"), rows(runs.multi, "train")
  assert [r["step"] for r in multi] == [r["step"] for r in single] != []
  for s, m in zip(single, multi):
    assert abs(m["loss"] - s["loss"]) <= tiny_cnn_training(m["step"]) * s["loss"]
    # Equal counts of correct predictions: a prediction would flip only for a logit
    # margin within float32 rounding of zero.
    assert m["accuracy"] == s["accuracy"]


def test_validation_is_exact_across_processes(runs):
  (single,), multi = rows(runs.single, "val"), rows(runs.multi, "val")
  assert len(multi) == 1, "only process 0 writes metrics"
  # An odd count: the processes hold 10 and 9 examples, and both pad their last batch.
  assert len(runs.dataset.val) % 2 == 1
  assert multi[0]["count"] == single["count"] == len(runs.dataset.val)
  assert multi[0]["accuracy"] == single["accuracy"]
  assert abs(multi[0]["loss"] - single["loss"]) <= (
      tiny_cnn_training(runs.steps_per_epoch) * single["loss"])


def test_only_process_zero_reports(runs):
  main_output, other_output = runs.multi_output
  assert "Done: epoch 1" in main_output and "epoch 1/1" in main_output
  assert "Classes" in main_output and "Process 0 of 2" in main_output
  assert "Done:" not in other_output and "epoch 1/1" not in other_output
  assert "Classes" not in other_output  # Info logs are process 0's.
  keys = [(r["step"], r["split"]) for r in metric_writers.read_metrics(runs.multi)]
  assert len(keys) == len(set(keys)) > 0, "each row once: process 1 wrote none"
  assert os.path.exists(os.path.join(runs.multi, "config.json"))


def test_a_plain_run_stays_single_process(runs):
  (output,) = runs.single_output
  assert "distributed runtime" not in output and "Done: epoch 1" in output


def test_checkpoint_from_two_processes_resumes_in_one(runs):
  assert f"Resumed from step {runs.steps_per_epoch}" in runs.multi_then_single_output[0]
  # The first epoch's rows come from the 2-process run; the second from the resumed one.
  steps = [r["step"] for r in rows(runs.multi_then_single, "train")]
  assert steps == sorted(set(steps)) and steps[-1] == 2 * runs.steps_per_epoch
  step, resumed = runs.state(runs.multi_then_single)
  # Continuing either first epoch, in either layout, gives the same second epoch.
  other_step, other = runs.state(runs.single_then_multi)
  assert step == other_step == 2 * runs.steps_per_epoch
  start = runs.start
  assert_trained_alike((resumed.params, resumed.batch_stats), (other.params, other.batch_stats),
                       (start.params, start.batch_stats), step, "either layout")
  _, first_epoch = runs.state(runs.multi_then_single, runs.steps_per_epoch)
  assert max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(resumed.params), jax.tree.leaves(first_epoch.params))) > 1e-3


def test_checkpoint_from_one_process_resumes_in_two(runs):
  main_output, _ = runs.single_then_multi_output
  assert f"Resumed from step {runs.steps_per_epoch}" in main_output
  assert "Done: epoch 2" in main_output
  val = rows(runs.single_then_multi, "val")
  assert [r["step"] for r in val] == [runs.steps_per_epoch, 2 * runs.steps_per_epoch]
  other = rows(runs.multi_then_single, "val")
  assert val[-1]["accuracy"] == other[-1]["accuracy"]
  assert abs(val[-1]["loss"] - other[-1]["loss"]) <= (
      tiny_cnn_training(2 * runs.steps_per_epoch) * other[-1]["loss"])


HELPERS_SCRIPT = """
import os, sys, time
from jaxcls import distributed

distributed.initialize("auto", sys.argv[1], 2, int(sys.argv[2]))
marker = os.path.join(sys.argv[3], "built")

def build():  # Process 0 writes slowly; process 1 must find the file complete.
  if distributed.is_main_process():
    time.sleep(1.0)
    with open(marker, "w") as f:
      f.write("complete")
  with open(marker) as f:
    return f.read()

assert distributed.on_main_process_first(build) == "complete"
distributed.check_same_everywhere(lambda: b"same", "should not fail")
try:
  distributed.check_same_everywhere(lambda: sys.argv[2].encode(), "lists differ")
except distributed.DistributedError as e:
  print("raised:", e)
"""


def test_main_process_first_and_the_same_data_check_across_processes(tmp_path):
  address = f"127.0.0.1:{free_port()}"
  env = subprocess_env(1, str(tmp_path / "cache"))
  procs = [subprocess.Popen([sys.executable, "-c", HELPERS_SCRIPT, address, str(i),
                             str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert [proc.returncode for proc in procs] == [0, 0], outputs
  assert all("raised: lists differ" in out for out in outputs), outputs


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path,
                                                                      shapes_dir):
  config = multihost_config(shapes_dir, num_epochs=30)  # 180 steps: far more than needed.
  workdir = str(tmp_path / "signalled")
  run = Run(write_config_file(str(tmp_path), config), workdir,
            str(tmp_path / "compile_cache"), processes=2, devices=2)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while time.monotonic() < deadline and all(p.poll() is None for p in run.procs):
      try:
        if rows(workdir, "train"):  # The loop runs: its signal handlers are in place.
          break
      except (OSError, ValueError):  # Not written yet, or a line half written.
        pass
      time.sleep(0.2)
    run.procs[1].send_signal(signal.SIGTERM)  # Process 1 only, as a preempted host.
    outputs = run.finish(deadline, exit_code=128 + signal.SIGTERM)
  finally:
    for proc in run.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert "Stopped by SIGTERM" in outputs[0]
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    step = mngr.latest_step()
  finally:
    mngr.close()
  # Both stopped at a log interval, where they agree, and saved there together.
  assert step < 30 * 6 and step % config.train.log_every_steps == 0
  assert rows(workdir, "train")[-1]["step"] == step


# ---------------------------------------------------------------------------------------
# The loader's per-process shares (no JAX runtime needed)


def _row_keys(batch: dict, masked: bool = True) -> list:
  keep = batch["mask"] if masked else np.ones(len(batch["label"]), bool)
  return [hashlib.sha1(img.tobytes()).hexdigest() + str(label)
          for img, label, k in zip(batch["image"], batch["label"], keep) if k]


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_of_a_training_batch_tile_the_global_batch(shapes_dir,
                                                                  process_count):
  dataset = sources.build_dataset(tiny_config(f"folder:{shapes_dir}").data, seed=0)
  kwargs = dict(batch_size=16, image_size=16, seed=3, num_steps=8, start_step=5)
  whole = list(loader.train_batches(dataset.train, **kwargs))
  shares = [list(loader.train_batches(dataset.train, **kwargs, process_index=p,
                                      process_count=process_count))
            for p in range(process_count)]
  for step, batch in enumerate(whole):
    joined = {k: np.concatenate([s[step][k] for s in shares]) for k in batch}
    for key in batch:  # Process p holds rows p*B/P .. (p+1)*B/P-1 of the global batch.
      np.testing.assert_array_equal(joined[key], batch[key])


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shares_of_validation_cover_every_example_once(shapes_dir, process_count):
  dataset = sources.build_dataset(tiny_config(f"folder:{shapes_dir}").data, seed=0)
  kwargs = dict(batch_size=6 * process_count, image_size=16)
  whole = [k for b in loader.eval_batches(dataset.val, **kwargs) for k in _row_keys(b)]
  shares = [list(loader.eval_batches(dataset.val, **kwargs, process_index=p,
                                     process_count=process_count))
            for p in range(process_count)]
  assert len({len(s) for s in shares}) == 1, "every process runs the same batch count"
  keys = [k for s in shares for b in s for k in _row_keys(b)]
  assert collections.Counter(keys) == collections.Counter(whole)
  assert len(keys) == len(dataset.val)


# ---------------------------------------------------------------------------------------
# When to start the runtime


CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri",
                "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of making them."""
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
  return made


def test_a_plain_run_does_not_start_the_runtime(calls):
  assert distributed.initialize("auto") is False
  assert distributed.cluster_detected() is None
  assert calls == []


def test_flags_start_the_runtime_with_their_values(calls):
  assert distributed.initialize("auto", "10.0.0.1:1234", 4, 3) is True
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                    "process_id": 3}]


@pytest.mark.parametrize("env, detected", [
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, "SLURM"),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "TPU slice"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_environments_start_the_runtime_auto_detected(calls, monkeypatch, env,
                                                              detected):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.cluster_detected() == detected
  assert distributed.initialize("auto") is True
  assert calls == [{"coordinator_address": None, "num_processes": None,
                    "process_id": None}]


def test_single_task_slurm_job_and_single_host_tpu_stay_single_process(calls,
                                                                      monkeypatch):
  for name, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1",
                      "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                      "TPU_WORKER_HOSTNAMES": "localhost"}.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize("auto") is False
  assert distributed.initialize("on") is True  # Forced: JAX detects what it can.
  assert distributed.initialize("off") is False
  assert len(calls) == 1


@pytest.mark.parametrize("kwargs, words", [
    (dict(mode="off", coordinator_address="h:1"), "--distributed=off"),
    (dict(num_processes=2, process_id=2), "--process-id=2"),
    (dict(num_processes=0), "--num-processes=0"),
    (dict(mode="sometimes"), "'sometimes'"),
])
def test_inconsistent_flags_are_named(calls, kwargs, words):
  with pytest.raises(distributed.DistributedError, match=words):
    distributed.initialize(**kwargs)
  assert calls == []


def test_nothing_to_join_is_explained(calls, monkeypatch):
  def no_cluster(**kwargs):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  with pytest.raises(distributed.DistributedError, match="--coordinator-address=HOST0"):
    distributed.initialize("on")
