"""A run on disk (jaxcls.workdir): the checkpoint's record, loading a run back, and
workdirs written by jaxcls 0.1 (tests/fixtures/workdir_v0_1, trained by 0.1 on 16 px
shapes: one epoch, CNN widths (4,), batch 8) and 0.2 (tests/fixtures/workdir_v0_2: the
same with optim.ema_decay=0.5, so with a weight average)."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import ROOT
from jaxcls import config as config_lib
from jaxcls import train, workdir
from jaxcls.data import sources
from jaxcls.serve import Predictor
from numerics import agreement, normwise_error

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.


FIXTURE = os.path.join(ROOT, "tests", "fixtures", "workdir_v0_1")
# What jaxcls 0.1 predicted with that checkpoint for the images below.
V0_1_PROBABILITIES = [[0.3078064024448395, 0.6921935677528381],
                      [0.3223572373390198, 0.6776427626609802]]
FIXTURE_V0_2 = os.path.join(ROOT, "tests", "fixtures", "workdir_v0_2")
# What jaxcls 0.2 predicted (tta=False) with each of its weights, for the same images.
V0_2_PROBABILITIES = {"raw": [[0.30742505192756653, 0.6925749182701111],
                              [0.3225146532058716, 0.6774853467941284]],
                      "ema": [[0.3103763163089752, 0.6896236538887024],
                              [0.3226218819618225, 0.6773781180381775]]}


@pytest.fixture
def old_workdir(tmp_path):
  """A copy: nothing a test does may change the fixture."""
  return shutil.copytree(FIXTURE, str(tmp_path / "old"))


def test_run_meta_round_trips_through_json():
  meta = workdir.RunMeta(
      config=json.loads(config_lib.to_json(config_lib.base_config())),
      class_names=("a", "b"), step=12, epoch=2,
      progress=workdir.Progress(
          best=workdir.Best(0.75, 1, 6), epoch_sums=workdir.EpochSums(1.5, 1.0, 2),
          last_epoch=workdir.EpochMetrics(2, 12, 0.5, 0.8, 0.6, 0.7)))
  data = json.loads(json.dumps(meta.to_json()))
  assert data["format_version"] == workdir.FORMAT_VERSION
  assert workdir.RunMeta.from_json(data) == meta
  assert meta.describe() == "step 12 (epoch 2, val accuracy 0.7000)"
  mid_epoch = workdir.RunMeta(config={}, class_names=("a", "b"), step=14, epoch=2)
  assert mid_epoch.describe() == "step 14 (mid-epoch 3)"


def test_version_1_records_read_as_typed_objects():
  """The untyped dict jaxcls 0.1 wrote: "metrics" beside "progress", no version."""
  v1 = {"config": {}, "class_names": ["cat", "dog"], "epoch": 3, "step": 30,
        "metrics": {"epoch": 3, "step": 30, "train_loss": 0.4, "train_accuracy": 0.8,
                    "val_loss": 0.5, "val_accuracy": 0.75},
        "progress": {"best": {"val_accuracy": 0.8, "epoch": 2, "step": 20},
                     "epoch_sums": {"loss": 0.0, "accuracy": 0.0, "steps": 0}}}
  meta = workdir.RunMeta.from_json(v1)
  assert meta.progress.best == workdir.Best(0.8, 2, 20)
  assert meta.progress.last_epoch.val_accuracy == 0.75 and meta.epoch == 3
  imported = workdir.RunMeta.from_json({"config": {}, "class_names": ["0"], "step": 0,
                                        "epoch": 0, "metrics": {},
                                        "imported_from": {"arch": "resnet50"}})
  assert imported.progress.last_epoch is None and imported.imported_from["arch"] == "resnet50"


def test_a_version_0_1_workdir_loads_and_predicts_as_it_did(old_workdir):
  run = workdir.load_run(old_workdir)
  assert run.class_names == ("disc", "stripes") and run.step == 4
  assert run.description == "the best checkpoint: step 4 (epoch 1, val accuracy 0.3750)"
  predictor = Predictor.from_workdir(old_workdir)
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  probs, labels = predictor.predict_arrays(images)
  assert labels.tolist() == [1, 1]
  # Another implementation of the same layers (0.1's, and flax's own now): float32
  # rounding apart, through 2 convolutions of at most 36 terms and the head.
  assert normwise_error(probs, V0_1_PROBABILITIES) <= agreement(3, 36)


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_a_version_0_2_workdir_loads_and_predicts_as_it_did(tmp_path, weights):
  old = shutil.copytree(FIXTURE_V0_2, str(tmp_path / "old"))
  predictor = Predictor.from_workdir(old, weights=weights, tta=False)
  average = ", its weight average" if weights == "ema" else ""
  assert predictor.checkpoint_description == (
      f"the best checkpoint: step 4 (epoch 1, val accuracy 0.3750){average}")
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  probs, labels = predictor.predict_arrays(images)
  assert labels.tolist() == [1, 1]
  # As for 0.1: at most float32 rounding apart through 2 convolutions and the head.
  assert normwise_error(probs, V0_2_PROBABILITIES[weights]) <= agreement(3, 36)


def test_a_version_0_1_workdir_resumes(old_workdir, tmp_path):
  # Its data were drawn into a temporary folder: the same drawing again.
  sources.draw_shapes(str(tmp_path / "shapes"), per_class=20, seed=0, size=16)
  config = workdir.load_run(old_workdir).config
  config.data.source = f"folder:{tmp_path / 'shapes'}"
  config.num_epochs = 2
  _, summary = train.train_and_evaluate(config, old_workdir, resume="require")
  assert summary.resumed_from == 4 and summary.last_epoch.epoch == 2
  assert summary.stop_reason == "finished"
  again = workdir.load_run(old_workdir, step=summary.final_step)
  assert again.meta.progress.best is not None and again.meta.epoch == 2


def test_loading_a_missing_run_or_step_says_what_there_is(tmp_path, old_workdir):
  with pytest.raises(workdir.NoCheckpointError,
                     match=f"^No checkpoints in '{tmp_path}'. Train first"):
    workdir.load_run(str(tmp_path))
  with pytest.raises(workdir.UnknownStepError,
                     match=r"^No checkpoint at step 3 in '.*old'; have \[4\]\.$"):
    workdir.load_run(old_workdir, step=3)
