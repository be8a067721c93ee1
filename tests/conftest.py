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


@pytest.fixture(scope="session")
def predict_workdir(tmp_path_factory, shapes_dir):
  """A workdir with a tiny-model checkpoint (random weights, no training: seconds, not
  a minute) for the shapes_dir classes."""
  from jaxcls.predict_benchmark import write_random_workdir
  workdir = str(tmp_path_factory.mktemp("predict_workdir"))
  write_random_workdir(workdir, tiny_config(f"folder:{shapes_dir}"), ("circle", "square"),
                       step=6)
  return workdir
