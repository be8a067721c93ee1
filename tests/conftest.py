"""Test setup: 8 CPU devices (set before JAX is imported) and small shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from jaxcls.config import base_config  # noqa: E402
from jaxcls.data import sources  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A two-class image folder (circle/, square/) of 32 px JPEGs and PNGs, 60 per class."""
  root = str(tmp_path_factory.mktemp("shapes"))
  sources.draw_shapes(root, per_class=60, seed=0, size=32)
  return root


def tiny_config(source: str, **overrides):
  """A config small enough to compile and train in seconds on a CPU."""
  config = base_config()
  config.data.source = source
  config.data.image_size = 16
  config.data.workers = 2
  config.model.widths = (8, 16)
  config.model.dropout = 0.0
  config.batch_size = 16
  config.num_epochs = 1
  config.optim.learning_rate = 0.02
  config.train.log_every_steps = 2
  config.train.progress_bar = False
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for part in parents:
      target = target[part]
    target[leaf] = value
  return config


@pytest.fixture
def make_config():
  return tiny_config



def save_untrained_workdir(workdir: str, config, class_names, step: int = 6) -> None:
  """Writes a checkpoint the way training does, without training or compiling.

  Jitting `model.init` costs 30 s or more on a loaded 2-core machine (threefry), so the
  state's structure comes from `jax.eval_shape` and its values from numpy: He-scaled
  kernels, random biases and batch-norm scales, and non-trivial running statistics, so
  that inference mode (running averages) differs from training mode (batch statistics).
  """
  import jax
  import numpy as np
  from jaxcls import checkpoint
  from jaxcls.models import create_model
  from jaxcls.train import create_train_state
  model = create_model(config.model, len(class_names))
  shapes = jax.eval_shape(
      lambda: create_train_state(config, model, jax.random.key(config.seed), step))
  rng = np.random.default_rng(config.seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      values = rng.normal(0.0, np.sqrt(2.0 / np.prod(x.shape[:-1])), x.shape)
    elif name.endswith("['mean']") or name.endswith("['bias']"):
      values = rng.normal(0.0, 0.3, x.shape)
    elif name.endswith("['var']") or name.endswith("['scale']"):
      values = rng.uniform(0.5, 2.0, x.shape)
    else:
      values = np.zeros(x.shape)
    return np.asarray(values, x.dtype)

  state = jax.tree_util.tree_map_with_path(fill, shapes).replace(step=np.int32(step))
  mngr = checkpoint.manager(workdir)
  checkpoint.save(mngr, step, state, {
      "config": config.to_dict(), "class_names": list(class_names), "epoch": 1,
      "step": step, "metrics": {"epoch": 1, "step": step, "val_accuracy": 0.5}})
  mngr.wait_until_finished()
  mngr.close()


@pytest.fixture(scope="session")
def predict_workdir(tmp_path_factory, shapes_dir):
  """A workdir with an (untrained) tiny-model checkpoint for the shapes_dir classes."""
  workdir = str(tmp_path_factory.mktemp("predict_workdir"))
  save_untrained_workdir(workdir, tiny_config(f"folder:{shapes_dir}"), ("circle", "square"))
  return workdir
