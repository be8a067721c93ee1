"""Test setup: 8 CPU devices (set before JAX is imported) and small shared fixtures."""

import logging
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs: JAX's persistent cache compiles each once,
# also across the subprocesses that tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxcls-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# jaxcls's oneDNN convolutions, built once for all tests and their subprocesses, outside
# the user's cache folder.
os.environ.setdefault("JAXCLS_CACHE_DIR",
                      os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxcls-test-cache"))

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # The repository.

from jaxcls.config import base_config  # noqa: E402
from jaxcls.data import sources  # noqa: E402


@pytest.fixture(autouse=True)
def restore_root_logging():
  """A program run in-process sets up logging on the root logger, bound to the stderr
  pytest captures for that one test: each test gets the root logger back as it was, so
  no later test logs to a closed stream (whatever order the tests run in)."""
  handlers, level = list(logging.root.handlers), logging.root.level
  yield
  logging.root.handlers[:] = handlers
  logging.root.setLevel(level)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A two-class image folder (disc/, stripes/) of 32 px JPEGs and PNGs, 66 per class (101 train, 31 val)."""
  root = str(tmp_path_factory.mktemp("shapes"))
  sources.draw_shapes(root, per_class=66, seed=0, size=32)
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
  config.train.log_images = 0  # The TensorBoard image grid costs a compile per run.
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
  from jaxcls.benchmark.predict import write_random_workdir
  workdir = str(tmp_path_factory.mktemp("predict_workdir"))
  write_random_workdir(workdir, tiny_config(f"folder:{shapes_dir}"), ("disc", "stripes"),
                       step=6)
  return workdir


@pytest.fixture
def mock_cats_vs_dogs(monkeypatch):
  """Fake cats_vs_dogs records holding encoded PNG bytes, as a prepared set would.

  mock_data encodes its random images with TensorFlow; without TensorFlow installed
  (the normal case: it is only needed to prepare a set) the same PNGs come from Pillow.
  """
  import importlib.util
  import io
  import numpy as np
  import tensorflow_datasets as tfds
  from PIL import Image
  from tensorflow_datasets.core.features import image_feature
  if importlib.util.find_spec("tensorflow") is None:
    def encode_png(self, array):
      buffer = io.BytesIO()
      Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
      return buffer.getvalue()
    monkeypatch.setattr(image_feature._ImageEncoder, "_encode_image", encode_png)
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    yield
