"""The config schema: validation, saved configs, and recipes as diffs from the base."""

import ast
import os

import pytest

from conftest import ROOT
from jaxcls import config as config_lib
from jaxcls.cli import common


def parse(*overrides, recipe="demo.py"):
  """A recipe with command-line overrides, read the way the programs read them."""
  return common.load_config(os.path.join(ROOT, "configs", recipe),
                            common.split_overrides(overrides)[1])


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


def _recipes():
  return sorted(name for name in os.listdir(os.path.join(ROOT, "configs"))
                if name.endswith(".py") and not name.startswith("_"))


@pytest.mark.parametrize("recipe", _recipes())
def test_recipes_set_only_what_differs_from_the_base_config(recipe):
  """A recipe is a diff: every `config.KEY = VALUE` it writes changes the default."""
  defaults = config_lib.flatten(config_lib.base_config())
  tree = ast.parse(open(os.path.join(ROOT, "configs", recipe)).read())
  restated, assigned = [], 0
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    target = ast.unparse(node.targets[0])
    if not target.startswith("config."):
      continue
    assigned += 1
    key = target[len("config."):]
    assert key in defaults, f"{recipe} sets unknown key {key}"
    value = ast.literal_eval(node.value)
    value = tuple(value) if isinstance(value, list) else value
    if value == defaults[key]:
      restated.append(key)
  assert assigned > 0 and restated == [], f"{recipe} restates defaults: {restated}"


def test_saved_configs_of_version_1_still_load():
  """A config saved by jaxcls 0.1 (no key renamed since) loads, and a key the schema no
  longer has is an error naming it."""
  saved = config_lib.base_config().to_dict()
  restored = config_lib.from_dict(saved)
  assert restored.to_dict() == saved
  saved["optim"]["lr"] = 0.1
  with pytest.raises(config_lib.ConfigError, match="optim.lr"):
    config_lib.from_dict(saved)


def test_float16_is_refused_with_the_reason_and_the_way_out():
  config = parse("--config.model.dtype=float16")
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value) == (
      "Config key 'model.dtype' is 'float16'; float16 needs loss scaling, which jaxcls "
      "does not do (small gradients would underflow to zero); use 'bfloat16' (float32's "
      "range, the same speed) or 'auto'.")
  config.model.dtype = "auto"
  config_lib.validate(config)
