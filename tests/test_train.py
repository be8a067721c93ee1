"""Train → checkpoint → resume → predict, through the public API and the CLIs."""

import copy
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config
from jaxcls import config as config_lib
from jaxcls import metric_writers, train
from jaxcls.data import preprocess, sources
from jaxcls.serve import Predictor, predict

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The demo recipe, shrunk: 150 images per class, 6 epochs on 8 devices."""
  workdir = str(tmp_path_factory.mktemp("demo"))
  config = tiny_config("generated:shapes", **{
      "data.generated_per_class": 150, "data.image_size": 32, "model.widths": (16, 32, 64),
      "num_epochs": 6, "optim.learning_rate": 0.02, "augment.rotation": 5.0,
      "augment.scale": (0.95, 1.05)})
  state, final = train.train_and_evaluate(config, workdir)
  return workdir, config, state, final


def test_demo_learns(trained):
  workdir, config, _, final = trained
  assert final.stop_reason == "finished" and final.trained and final.resumed_from is None
  assert final.last_epoch.epoch == 6
  assert final.last_epoch.val_accuracy >= 0.85, final
  rows = metric_writers.read_metrics(workdir)
  val_rows = [r for r in rows if r["split"] == "val"]
  assert [r["epoch"] for r in val_rows] == [1, 2, 3, 4, 5, 6]
  for row in rows:
    assert {"step", "epoch", "split", "loss", "accuracy"} <= set(row)
  assert val_rows[-1]["accuracy"] == final.last_epoch.val_accuracy
  dataset = sources.build_dataset(config.data, config.seed, workdir)
  assert val_rows[-1]["count"] == len(dataset.val)  # Every validation image, once.
  # 0.1 code read the result as a dict; 0.2 warned, 0.3 has attributes only.
  assert final.as_dict()["val_accuracy"] == final.last_epoch.val_accuracy
  with pytest.raises(TypeError, match="not subscriptable"):
    final["val_accuracy"]  # pylint: disable=pointless-statement


def test_finished_run_does_nothing_more_and_says_so(trained, caplog):
  workdir, config, state, final = trained
  before = metric_writers.read_metrics(workdir)
  # A notebook user changes a hyperparameter and runs the same workdir again.
  changed = copy.deepcopy(config)
  changed.optim.learning_rate = 0.5
  with caplog.at_level(logging.WARNING, logger="jaxcls"):
    again_state, again = train.train_and_evaluate(changed, workdir)
  assert metric_writers.read_metrics(workdir) == before
  assert again.stop_reason == "already_finished" and not again.trained
  assert again.changed_keys == ("optim.learning_rate",)
  assert again.final_step == final.final_step == again.resumed_from
  assert again.last_epoch == final.last_epoch
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any("nothing was trained" in w and "optim.learning_rate" in w for w in warnings)
  assert int(again_state.step) == int(state.step)
  np.testing.assert_array_equal(again_state.params["head"]["kernel"],
                                state.params["head"]["kernel"])


def test_resume_modes(trained, shapes_dir, tmp_path):
  workdir, config, _, _ = trained
  with pytest.raises(train.WorkdirError, match="already holds a run, and resume='never'"):
    train.train_and_evaluate(config, workdir, resume="never")
  empty = str(tmp_path / "empty")
  with pytest.raises(train.WorkdirError, match="holds no checkpoint to resume from"):
    train.train_and_evaluate(tiny_config(f"folder:{shapes_dir}"), empty, resume="require")
  assert not os.path.exists(os.path.join(empty, "checkpoints"))
  with pytest.raises(config_lib.ConfigError, match="resume='sometimes'"):
    train.train_and_evaluate(config, workdir, resume="sometimes")


def test_resume_continues_at_next_epoch(shapes_dir, tmp_path):
  workdir = str(tmp_path / "w")
  # A constant learning rate: a cosine schedule would depend on num_epochs.
  config = tiny_config(f"folder:{shapes_dir}", num_epochs=1, **{"optim.schedule": "constant"})
  state1, final1 = train.train_and_evaluate(config, workdir)
  assert final1.last_epoch.epoch == 1
  config.num_epochs = 2
  state2, final2 = train.train_and_evaluate(config, workdir, resume="require")
  assert final2.last_epoch.epoch == 2 and final2.resumed_from == int(state1.step)
  assert final2.changed_keys == ("num_epochs",)
  assert int(state2.step) == 2 * int(state1.step)
  epochs = [r["epoch"] for r in metric_writers.read_metrics(workdir) if r["split"] == "val"]
  assert epochs == [1, 2]  # Epoch 1 was not trained again.

  # The resumed run ends bit-identical to an uninterrupted two-epoch run.
  straight, _ = train.train_and_evaluate(config, str(tmp_path / "straight"))
  np.testing.assert_array_equal(straight.params["head"]["kernel"],
                                state2.params["head"]["kernel"])


def test_predict_files_matches_arrays_and_reports_broken(trained, tmp_path):
  workdir, config, _, _ = trained
  predictor = Predictor.from_workdir(workdir)
  assert predictor.class_names == ("disc", "stripes")
  images_dir = os.path.join(workdir, "generated_shapes")
  good = [os.path.join(images_dir, "disc", "disc_0001.png"),
          os.path.join(images_dir, "stripes", "stripes_0002.jpg")]
  broken = tmp_path / "broken.jpg"
  broken.write_text("not an image")
  results = predictor.predict_files([good[0], str(broken), good[1]])
  assert [r.ok for r in results] == [True, False, True]
  assert "broken.jpg" in results[1].path and results[1].error
  for r in (results[0], results[2]):
    assert r.label == max(r.probabilities, key=r.probabilities.get)

  arrays = np.stack([preprocess.load_image(p, 32) for p in good])
  probs, labels = predict(predictor.variables, arrays, model=predictor.model)
  np.testing.assert_allclose([results[0].probability, results[2].probability],
                             np.asarray(probs)[np.arange(2), np.asarray(labels)], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
  from_images = predictor.predict_images(list(arrays))
  assert [r.probabilities for r in from_images] == [results[0].probabilities,
                                                    results[2].probabilities]


def test_predict_cli(trained, tmp_path):
  workdir, _, _, _ = trained
  folder = tmp_path / "inputs"
  shutil.copytree(os.path.join(workdir, "generated_shapes", "disc"), folder / "disc")
  (folder / "empty.jpg").write_bytes(b"")
  run = subprocess.run(
      [sys.executable, "-m", "jaxcls.cli.predict", "--workdir", workdir, "--json",
       str(folder)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert run.returncode == 1, run.stderr  # One file failed.
  assert "Traceback" not in run.stderr
  rows = [json.loads(line) for line in run.stdout.splitlines()]
  assert len(rows) == 151
  errors = [r for r in rows if "error" in r]
  assert len(errors) == 1 and errors[0]["path"].endswith("empty.jpg")
  labels = [r["label"] for r in rows if "label" in r]
  assert labels.count("disc") >= 0.85 * 150
  assert set(rows[0]["probabilities"]) == {"disc", "stripes"}


def test_split_is_stable_when_files_are_added(shapes_dir, tmp_path):
  root = tmp_path / "data"
  shutil.copytree(shapes_dir, root)
  config = tiny_config(f"folder:{root}")
  first = sources.build_dataset(config.data, seed=0)
  for i in range(20):
    shutil.copy(root / "disc" / "disc_0000.jpg", root / "disc" / f"extra_{i}.jpg")
  second = sources.build_dataset(config.data, seed=0)
  assert set(first.val.paths) <= set(second.val.paths)
  assert set(first.train.paths) <= set(second.train.paths)
  other_seed = sources.build_dataset(config.data, seed=1)
  assert set(other_seed.val.paths) != set(second.val.paths)


def _error_for(config, workdir):
  with pytest.raises((config_lib.ConfigError, sources.DataError, train.WorkdirError)) as e:
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  return str(e.value)


def test_bad_inputs_fail_early_with_clear_errors(shapes_dir, tmp_path):
  one_class = tmp_path / "one"
  shutil.copytree(os.path.join(shapes_dir, "disc"), one_class / "disc")
  msg = _error_for(tiny_config(f"folder:{one_class}"), str(tmp_path / "w1"))
  assert "at least two" in msg and "class folder" in msg

  empty_class = tmp_path / "empty"
  shutil.copytree(shapes_dir, empty_class)
  os.makedirs(empty_class / "cat")
  msg = _error_for(tiny_config(f"folder:{empty_class}"), str(tmp_path / "w2"))
  assert "cat" in msg and "no images" in msg

  msg = _error_for(tiny_config(f"folder:{tmp_path}/missing"), str(tmp_path / "w3"))
  assert "does not exist" in msg and "missing" in msg

  msg = _error_for(tiny_config(f"folder:{shapes_dir}", batch_size=12), str(tmp_path / "w4"))
  assert "batch_size=12" in msg and "8 devices" in msg and "multiple of 8" in msg

  blocker = tmp_path / "file"
  blocker.write_text("a file where the workdir should be")
  msg = _error_for(tiny_config(f"folder:{shapes_dir}"), str(blocker / "workdir"))
  assert "Cannot write to workdir" in msg


def test_readme_python_example_runs(tmp_path):
  """The README's Python example, run as a user would (paths moved to tmp_path)."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("## Train and predict from Python", 1)[1]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  code = code.replace("/tmp/api_demo", str(tmp_path / "api_demo"))
  code += "\nassert summary.last_epoch.epoch == 3 and probabilities.shape == (1, 2)\n"
  script = tmp_path / "example.py"
  script.write_text(code)
  run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600, cwd=str(tmp_path))
  assert run.returncode == 0, run.stderr[-3000:]
  assert "validation accuracy" in run.stdout
  assert "disc_0000.jpg" in run.stdout
