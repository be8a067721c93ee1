"""The recipes on a real small data set: scikit-learn's digits (1,797 scans of
handwritten digits, 8×8, shipped with scikit-learn, no download), upscaled to 16 px."""

import math
import os

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from jaxcls import config as config_lib
from jaxcls import metric_writers, train
from jaxcls.cli import common

pytestmark = pytest.mark.slow  # Trains two recipes.

# Digits are not photographs: a mirror, a rotation, a crop of a third of the image or a
# solarized stroke changes what a digit is. Both recipes run without those; what is
# compared is the rest: optimizer and schedule, weight average, mixup, label smoothing,
# dropout.
NOT_FOR_DIGITS = [("augment.flip", "false"), ("augment.rotation", "0"),
                  ("augment.scale", "(1.0, 1.0)"), ("augment.crop_area", "(1.0, 1.0)"),
                  ("augment.policy", "none")]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  sklearn_datasets = pytest.importorskip("sklearn.datasets")
  digits = sklearn_datasets.load_digits()
  root = tmp_path_factory.mktemp("digits")
  for index, (image, label) in enumerate(zip(digits.images, digits.target)):
    folder = root / str(label)
    folder.mkdir(exist_ok=True)
    pixels = np.asarray(image * 255 / 16, np.uint8)  # 17 grey levels, 0..16.
    Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR).save(
        folder / f"{index:04d}.png")
  return str(root)


def _train(recipe: str, digits_dir: str, workdir: str):
  """The recipe at the tests' scale: 16 px, a small CNN, batch 64, 15 epochs."""
  config = common.load_config(os.path.join(ROOT, "configs", recipe), [
      ("data.source", f"folder:{digits_dir}"), ("data.image_size", "16"),
      ("data.workers", "2"), ("model.widths", "(16, 32)"), ("batch_size", "64"),
      ("num_epochs", "15"), ("train.progress_bar", "false"), ("train.log_images", "0"),
      *NOT_FOR_DIGITS])
  _, summary = train.train_and_evaluate(config, workdir)
  return summary


def test_the_modern_recipe_reaches_the_accuracy_of_the_plain_one(digits_dir, tmp_path):
  plain = _train("catdog.py", digits_dir, str(tmp_path / "plain")).last_epoch
  modern = _train("catdog_modern.py", digits_dir, str(tmp_path / "modern")).last_epoch
  print(f"digits, 15 epochs: plain {plain.val_accuracy:.4f}, modern "
        f"{modern.val_accuracy:.4f}, its weight average {modern.val_ema_accuracy:.4f}")
  assert plain.val_accuracy > 0.95  # Both learn: the comparison means something.
  # Measured on ~360 validation images, an accuracy p is known to about
  # sqrt(p (1 − p) / n); two standard errors of slack for that sampling noise (and for
  # the runs' float32 rounding, which differs between CPUs and steers training).
  count = [r for r in metric_writers.read_metrics(str(tmp_path / "plain"))
           if r["split"] == "val"][-1]["count"]
  noise = 2 * math.sqrt(plain.val_accuracy * (1 - plain.val_accuracy) / count)
  assert modern.val_ema_accuracy >= plain.val_accuracy - noise
  assert modern.val_accuracy >= plain.val_accuracy - noise


def test_the_modern_recipe_uses_every_new_knob():
  config = common.load_config(os.path.join(ROOT, "configs", "catdog_modern.py"))
  config_lib.validate(config)
  assert config.optim.name == "adamw" and config.optim.ema_decay > 0
  assert config.augment.crop_area != (1.0, 1.0) and config.augment.policy != "none"
  assert config.augment.mixup_alpha > 0 and config.train.label_smoothing > 0
