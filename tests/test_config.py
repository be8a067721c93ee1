"""Config files, command-line overrides and validation."""

import os
import subprocess
import sys
from unittest import mock

import pytest
from absl import flags
from ml_collections import config_flags

from jaxcls import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*overrides, recipe="demo.py"):
  """Parses flags the way run_train.py does (config_flags also reads sys.argv)."""
  argv = ["prog", f"--config={ROOT}/configs/{recipe}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
  with mock.patch.object(sys, "argv", argv):
    values(argv)
  return values.config


def test_override_changes_value():
  config = parse("--config.optim.learning_rate=0.05", "--config.augment.flip=False",
                 "--config.augment.scale=(0.8,1.25)", "--config.batch_size=48")
  assert config.optim.learning_rate == 0.05
  assert config.augment.flip is False
  assert tuple(config.augment.scale) == (0.8, 1.25)
  assert config.batch_size == 48
  config_lib.validate(config)


def test_unknown_key_on_command_line_names_it():
  with pytest.raises(Exception, match="learning_rat"):
    parse("--config.optim.learning_rat=0.05")


def test_wrong_type_on_command_line_fails():
  with pytest.raises(Exception, match="batch_size"):
    parse("--config.batch_size=many")


def test_validate_names_unknown_key_and_suggests():
  config = parse()
  config.unlock()
  config.optim.lr = 0.1
  with pytest.raises(config_lib.ConfigError, match=r"optim\.lr.*optim\.l1"):
    config_lib.validate(config)


@pytest.mark.parametrize("key,value,match", [
    ("data.val_fraction", 1.5, "data.val_fraction"),
    ("augment.scale", (1.2, 0.8), "augment.scale"),
    ("model.dropout", 1.0, "model.dropout"),
    ("data.source", "", "data.source"),
])
def test_validate_rejects_bad_values(key, value, match):
  config = parse()
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_every_recipe_is_valid():
  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if name.endswith(".py") and not name.startswith("_"):
      config_lib.validate(parse(recipe=name))


def test_saved_config_round_trips():
  config = parse("--config.model.widths=(4,8)")
  restored = config_lib.from_dict(config.to_dict())
  assert restored.to_dict() == config.to_dict()
  assert isinstance(restored.model.widths, tuple)


def test_cli_unknown_key_exits_with_message(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run_train.py"), "--config",
       os.path.join(ROOT, "configs/demo.py"), "--workdir", str(tmp_path / "w"),
       "--config.optim.momentun=0.5"], capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "momentun" in result.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()
