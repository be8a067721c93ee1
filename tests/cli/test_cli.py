"""The command-line programs: one flag style, --help that lists every flag, config
overrides read as their key's type, and one way of failing (one `error:` line, exit 2)."""

import asyncio
import gc
import os
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT
from jaxcls import config as config_lib
from jaxcls.cli import common

DEMO = os.path.join(ROOT, "configs", "demo.py")
BIN = os.path.dirname(sys.executable)


def _run(args, timeout=120, **kwargs):
  return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": ROOT}, **kwargs)


def test_overrides_are_read_as_their_keys_types():
  config = common.load_config(DEMO, common.split_overrides([
      "--config.optim.learning_rate=0.05", "--config.augment.flip=False",
      "--config.augment.scale", "(0.8,1.25)", "--config.batch_size=48",
      "--config.model.head_hidden=256", "--config.augment.rotation=0"])[1])
  assert config.optim.learning_rate == 0.05
  assert config.augment.flip is False
  assert tuple(config.augment.scale) == (0.8, 1.25)
  assert config.batch_size == 48
  assert tuple(config.model.head_hidden) == (256,)
  assert config.augment.rotation == 0.0 and isinstance(config.augment.rotation, float)
  config_lib.validate(config)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0.1", "Unknown config key 'optim.lr' (--config.optim.lr=0.1). Did you mean "
                     "optim.learning_rate"),
    ("optim.momentun=0.5", "Unknown config key 'optim.momentun' (--config.optim.momentun="
                           "0.5). Did you mean optim.momentum"),
    ("foo=1", "Unknown config key 'foo' (--config.foo=1). Known keys: augment.*, "
              "batch_size"),
    ("batch_size=many", "--config.batch_size='many': expected a whole number, like the "
                        "default 32."),
    ("augment.flip=maybe", "--config.augment.flip='maybe': expected true or false"),
])
def test_bad_override_is_a_config_error_naming_the_key(override, message):
  with pytest.raises(config_lib.ConfigError) as raised:
    common.load_config(DEMO, common.split_overrides([f"--config.{override}"])[1])
  assert str(raised.value).startswith(message), str(raised.value)


@pytest.mark.slow
@pytest.mark.parametrize("override, key", [("optim.lr=0.1", "optim.learning_rate"),
                                           ("foo=1", "Known keys")])
def test_training_with_an_unknown_key_prints_one_error_line_and_exits_2(tmp_path, override,
                                                                        key):
  result = _run([sys.executable, "run_train.py", "--config", DEMO,
                 "--workdir", str(tmp_path / "w"), f"--config.{override}"])
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: Unknown config key"), result.stderr
  assert key in lines[0] and "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()  # Nothing was started.


@pytest.mark.slow
def test_training_that_fails_while_preparing_prints_only_its_error(tmp_path, shapes_dir):
  """Orbax's start-up thread once printed a traceback after the error (a race)."""
  result = _run([sys.executable, "run_train.py", "--config", DEMO,
                 "--workdir", str(tmp_path / "w"), f"--config.data.source=folder:{shapes_dir}",
                 "--config.init_from=/nonexistent", "--config.train.progress_bar=false"])
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(
      "error: init_from='/nonexistent' cannot be used: No checkpoints in '/nonexistent'.")
  assert result.stderr.strip().endswith(errors[0]), result.stderr  # Nothing after it.
  assert "Traceback" not in result.stderr


def test_programs_drop_only_the_closed_event_loop_callbacks_of_a_failed_save(monkeypatch):
  """A real unraisable RuntimeError from a closed loop's call_soon_threadsafe is dropped;
  any other unraisable exception still reaches the previous hook."""
  reached = []
  monkeypatch.setattr(sys, "unraisablehook", reached.append)
  common.drop_closed_loop_callbacks()
  common.drop_closed_loop_callbacks()  # Once is enough: no second wrapper.
  closed = asyncio.new_event_loop()
  closed.close()

  class LateCallback:
    def __init__(self, call):
      self.call = call

    def __del__(self):
      self.call()

  LateCallback(lambda: closed.call_soon_threadsafe(print))  # Unraisable at once.
  LateCallback(lambda: int("x"))
  gc.collect()
  assert [type(u.exc_value) for u in reached] == [ValueError]


TRAIN_FLAGS = ("--config", "--workdir", "--resume", "--distributed",
               "--coordinator-address", "--num-processes", "--process-id")


@pytest.mark.slow
@pytest.mark.parametrize("command", [[sys.executable, "run_train.py"],
                                     [os.path.join(BIN, "jaxcls-train")],
                                     [sys.executable, "-m", "jaxcls.cli.train"]])
def test_training_help_lists_every_flag_with_its_help(command):
  result = _run(command + ["--help"])
  assert result.returncode == 0, result.stderr
  for flag in TRAIN_FLAGS:
    assert flag in result.stdout, flag
  assert "Process 0's address" in result.stdout and "Recipe file" in result.stdout


PROGRAM_FLAGS = [
    ("jaxcls-predict", ("--workdir", "--top-k", "--tta", "--output", "--json", "--weights")),
    ("jaxcls-evaluate", ("--workdir", "--data", "--split", "--json", "--report",
                         "--weights")),
    ("jaxcls-export", ("--workdir", "--out", "--platforms", "--format", "--weights")),
    ("jaxcls-serve", ("--workdir", "--host", "--port", "--batch-sizes", "--max-wait-ms",
                      "--weights")),
    ("jaxcls-report", ("--workdir", "--out", "--top-k", "--bins")),
    ("jaxcls-inspect", ("--config", "--out", "--num")),
    ("jaxcls-pretrained", ("import",)),
    ("jaxcls-benchmark", ("step", "loader", "predict", "inference", "serve")),
    ("jaxcls-sweep", ("--config", "--workdir", "--trials", "--space", "--space-file",
                      "--pruner", "--storage")),
]


def test_every_installed_program_is_checked_here():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = set(tomllib.load(f)["project"]["scripts"])
  assert scripts == {name for name, _ in PROGRAM_FLAGS} | {"jaxcls-train"}


@pytest.mark.slow
@pytest.mark.parametrize("program, flags", PROGRAM_FLAGS)
def test_every_program_lists_its_flags_as_script_and_module(program, flags):
  """`jaxcls-NAME --help` lists its flags, and `python -m jaxcls.cli.NAME --help`, the
  one module form of every program, is the same program."""
  script = _run([os.path.join(BIN, program), "--help"])
  assert script.returncode == 0, script.stderr
  for flag in flags:
    assert flag in script.stdout, (program, flag)
  module = _run([sys.executable, "-m", "jaxcls.cli." + program.removeprefix("jaxcls-"),
                 "--help"])
  assert module.returncode == 0, module.stderr
  assert module.stdout == script.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["jaxcls-predict", "--workdir", "/nonexistent", "x.jpg"],
     "error: No checkpoints in '/nonexistent'. Train first"),
    (["jaxcls-predict", "x.jpg"], "error: the following arguments are required: --workdir"),
    (["jaxcls-export", "--workdir", "/nonexistent", "--out", "m", "--platforms", "cpu,gpu2"],
     "error: --platforms 'cpu,gpu2': unknown ['gpu2']"),
    (["jaxcls-report", "--workdir", "/nonexistent"], "error: No checkpoints in '/nonexistent'"),
    (["jaxcls-evaluate", "--workdir", "/nonexistent", "--data", "folder:/nonexistent"],
     "error: No checkpoints in '/nonexistent'"),
    (["jaxcls-serve", "--workdir", "/nonexistent", "--port", "0"],
     "error: No checkpoints in '/nonexistent'"),
    (["jaxcls-pretrained", "import", "--arch", "resnet18", "--weights", "/nonexistent.pth",
      "--out", "/tmp/x"], "error: No weights file at '/nonexistent.pth'."),
    (["jaxcls-benchmark", "nonsense"], "error: unknown benchmark 'nonsense'"),
])
def test_programs_fail_with_one_error_line_and_status_2(args, message):
  result = _run([os.path.join(BIN, args[0]), *args[1:]])
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(message), result.stderr
