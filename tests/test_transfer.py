"""Transfer learning end to end: init_from, a frozen backbone, unfreezing, new classes."""

import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import tiny_config
from jaxcls import checkpoint
from jaxcls.config import ConfigError
from jaxcls.serve import Predictor
from jaxcls.train import train_and_evaluate

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.


@pytest.fixture(scope="module")
def source_run(shapes_dir, tmp_path_factory):
  """A finished 2-class run with its own input normalization."""
  workdir = str(tmp_path_factory.mktemp("source"))
  config = tiny_config(f"folder:{shapes_dir}", **{"model.input_mean": (100.0, 110.0, 120.0),
                                                  "model.input_std": (50.0, 60.0, 70.0)})
  state, _ = train_and_evaluate(config, workdir)
  return workdir, jax.device_get(state)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def trees_differ(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def checkpoints(workdir):
  """Variables at each saved step, oldest first."""
  mngr = checkpoint.manager(workdir, read_only=True)
  steps = mngr.all_steps()
  mngr.close()
  return [Predictor.from_workdir(workdir, step=s).variables for s in steps]


def test_frozen_backbone_is_bit_identical_until_unfrozen(shapes_dir, source_run, tmp_path):
  source_dir, source = source_run
  config = tiny_config(f"folder:{shapes_dir}", init_from=source_dir, num_epochs=3,
                       **{"optim.freeze": "backbone", "train.unfreeze_after_epochs": 2,
                          "optim.backbone_lr_mult": 0.5, "checkpoint.keep": 3})
  train_and_evaluate(config, str(tmp_path))
  first, second, unfrozen = checkpoints(str(tmp_path))
  # Epochs 1 and 2: only the head trains; backbone weights and statistics are untouched.
  for frozen in (first, second):
    assert_trees_equal(frozen["params"]["backbone"], source.params["backbone"])
    assert_trees_equal(frozen["batch_stats"]["backbone"], source.batch_stats["backbone"])
  assert trees_differ(first["params"]["head"], second["params"]["head"])
  # Epoch 3: the backbone trains too, while its batch norm stays in inference mode.
  assert trees_differ(unfrozen["params"]["backbone"], source.params["backbone"])
  assert_trees_equal(unfrozen["batch_stats"]["backbone"], source.batch_stats["backbone"])


def three_class_folder(shapes_dir: str, root: str) -> str:
  """disc/ and stripes/ from the shapes, plus inverted/ (stripes in inverted colours)."""
  for name in ("disc", "stripes"):
    shutil.copytree(os.path.join(shapes_dir, name), os.path.join(root, name))
  os.makedirs(os.path.join(root, "inverted"))
  square_dir = os.path.join(shapes_dir, "stripes")
  for name in sorted(os.listdir(square_dir)):
    with Image.open(os.path.join(square_dir, name)) as img:
      ImageOps.invert(img.convert("RGB")).save(
          os.path.join(root, "inverted", os.path.splitext(name)[0] + ".png"))
  return root


def test_two_class_checkpoint_initialises_a_three_class_run(shapes_dir, source_run,
                                                             tmp_path):
  source_dir, source = source_run
  data = three_class_folder(shapes_dir, str(tmp_path / "data"))
  workdir = str(tmp_path / "run")
  copied = shutil.copytree(source_dir, str(tmp_path / "source_copy"))
  config = tiny_config(f"folder:{data}", init_from=copied,
                       **{"optim.freeze": "backbone", "model.head_hidden": (12,)})
  train_and_evaluate(config, workdir)
  # A resume reads its own checkpoint, not init_from: the source may be gone by then.
  shutil.rmtree(copied)
  config.num_epochs = 2
  state, final = train_and_evaluate(config, workdir)
  assert final.last_epoch.epoch == 2
  assert source.params["head"]["kernel"].shape == (16, 2)
  assert state.params["head"]["kernel"].shape == (12, 3)
  assert state.params["head"]["hidden_0"]["kernel"].shape == (16, 12)
  assert_trees_equal(state.params["backbone"], source.params["backbone"])
  # The source's input normalization came along, so predict normalizes the same way.
  predictor = Predictor.from_workdir(workdir)
  assert predictor.class_names == ("disc", "inverted", "stripes")
  assert tuple(predictor.model.mean) == (100.0, 110.0, 120.0)
  assert tuple(predictor.model.std) == (50.0, 60.0, 70.0)


def test_init_from_a_different_architecture_names_both(shapes_dir, source_run, tmp_path):
  source_dir, _ = source_run
  config = tiny_config(f"folder:{shapes_dir}", init_from=source_dir,
                       **{"model.name": "resnet18"})
  with pytest.raises(ConfigError, match="holds a cnn backbone.*model.name is 'resnet18'"):
    train_and_evaluate(config, str(tmp_path))
