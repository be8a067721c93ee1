"""The report (jaxcls.report) and the TensorBoard events of training, on one tiny run."""

import glob
import io
import json
import math
import os
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from jaxcls import checkpoint, metric_writers, report, train
from jaxcls import workdir as workdir_lib
from jaxcls.benchmark.predict import write_random_workdir
from jaxcls.cli import report as report_cli
from jaxcls.data import preprocess, sources


@pytest.fixture(scope="module")
def run(shapes_dir, tmp_path_factory):
  """A 1-epoch run on the shapes fixture: its workdir and last metrics."""
  workdir = str(tmp_path_factory.mktemp("report_run"))
  _, last = train.train_and_evaluate(tiny_config(f"folder:{shapes_dir}", **{"train.log_images": 16}), workdir)
  return workdir, last


@pytest.fixture(scope="module")
def evaluation(run):
  evaluation, meta = report.load_validation(run[0], progress=False)
  return evaluation, meta


def _recorded(workdir, step):
  rows = [r for r in metric_writers.read_metrics(workdir) if r["split"] == "val" and
          r["step"] == step]
  assert len(rows) == 1
  return rows[0]


@pytest.mark.slow
def test_confusion_matrix_matches_recorded_accuracy(run, evaluation):
  workdir, last = run
  evaluation, meta = evaluation
  recorded = _recorded(workdir, meta.step)
  matrix = report.confusion_matrix(evaluation.labels, evaluation.predictions,
                                   len(evaluation.class_names))
  assert matrix.sum() == recorded["count"] == len(evaluation.paths)
  assert np.trace(matrix) / matrix.sum() == recorded["accuracy"]
  assert evaluation.loss == pytest.approx(recorded["loss"], rel=1e-5)
  # Rows are true classes: their sums are the class counts of the split.
  np.testing.assert_array_equal(matrix.sum(axis=1),
                                np.bincount(evaluation.labels, minlength=2))


@pytest.mark.slow
def test_top_losses_are_sorted_and_misclassified(evaluation):
  evaluation, _ = evaluation
  wrong = int(np.sum(evaluation.predictions != evaluation.labels))
  assert wrong >= 2, "the tiny run should still make mistakes for this test to bite"
  top = report.top_losses(evaluation, k=wrong - 1)
  assert len(top) == wrong - 1
  losses = [item["loss"] for item in top]
  assert losses == sorted(losses, reverse=True)
  for item in top:
    assert item["predicted"] != item["true"]
    assert item["path"].split(os.sep)[0] == item["true"]  # The class folder.
    assert item["loss"] == pytest.approx(-math.log(item["true_probability"]), rel=1e-4)
    assert item["probability"] == pytest.approx(
        evaluation.probabilities[item["index"]].max())
  left_out = (evaluation.predictions != evaluation.labels)
  left_out[[item["index"] for item in top]] = False
  assert evaluation.losses[left_out].max() <= losses[-1]


def test_top_losses_skip_correct_examples_with_high_loss():
  # Example 0 is right but unsure (loss 1.2); example 1 is wrong with a lower loss.
  probabilities = np.array([[0.30, 0.25, 0.25, 0.20], [0.40, 0.45, 0.10, 0.05],
                            [0.05, 0.05, 0.10, 0.80]])
  labels = np.array([0, 0, 0])
  evaluation = report.Evaluation(
      "/data", ("a/0.jpg", "a/1.jpg", "a/2.jpg"), ("a", "b", "c", "d"), labels,
      np.log(probabilities).astype(np.float32),
      -np.log(probabilities[np.arange(3), labels]).astype(np.float32))
  top = report.top_losses(evaluation, k=5)
  assert [item["index"] for item in top] == [2, 1]
  assert top[0]["predicted"] == "d" and top[0]["probability"] == pytest.approx(0.8)
  assert top[1]["true_probability"] == pytest.approx(0.40)


def test_ece_of_a_hand_built_example():
  confidences = np.array([0.95, 0.85, 0.62, 0.58, 0.33, 0.15])
  correct = np.array([1, 0, 1, 1, 0, 0])
  # Five bins of width 0.2: (0.8, 1] holds 0.95 and 0.85 (accuracy 0.5, confidence
  # 0.9); each other bin holds one example, right in (0.4, 0.6] and (0.6, 0.8].
  by_hand = (2 * abs(0.5 - 0.9) + abs(1 - 0.62) + abs(1 - 0.58) + abs(0 - 0.33)
             + abs(0 - 0.15)) / 6
  cal = report.calibration(confidences, correct, bins=5)
  assert cal["ece"] == pytest.approx(by_hand, abs=1e-12)
  assert by_hand == pytest.approx(2.08 / 6)
  assert cal["counts"] == [1, 1, 1, 1, 2]
  assert cal["accuracy"][4] == 0.5 and cal["confidence"][4] == pytest.approx(0.9)
  # From probabilities: the top-1 probability is the confidence.
  probabilities = np.array([[0.95, 0.05], [0.15, 0.85], [0.62, 0.38]])
  ece = report.expected_calibration_error(probabilities, np.array([0, 0, 0]), bins=5)
  assert ece == pytest.approx((2 * abs(0.5 - 0.9) + abs(1 - 0.62)) / 3)


def test_ece_bin_edges_and_a_calibrated_set():
  # 0 goes to the first bin, 1 to the last; a bin's upper edge belongs to it.
  cal = report.calibration(np.array([0.0, 1.0, 0.5]), np.array([0, 1, 1]), bins=2)
  assert cal["counts"] == [2, 1]
  # 70 % confident and 70 % right: perfectly calibrated.
  ten = report.calibration(np.full(10, 0.7), np.array([1] * 7 + [0] * 3), bins=10)
  assert ten["ece"] == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="equal-length"):
    report.calibration(np.ones(3), np.ones(2))


def test_per_class_scores_by_hand():
  matrix = np.array([[5, 1], [2, 2]])
  rows = {r["class"]: r for r in report.per_class_scores(matrix, ("cat", "dog"))}
  assert rows["cat"]["precision"] == pytest.approx(5 / 7)
  assert rows["cat"]["recall"] == pytest.approx(5 / 6)
  assert rows["cat"]["f1"] == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))
  assert rows["dog"]["precision"] == pytest.approx(2 / 3)
  assert rows["dog"]["recall"] == pytest.approx(0.5)
  assert rows["dog"]["support"] == 4 and rows["weighted avg"]["support"] == 10
  assert rows["macro avg"]["recall"] == pytest.approx((5 / 6 + 0.5) / 2)
  assert rows["weighted avg"]["recall"] == pytest.approx(7 / 10)  # = accuracy.
  # A class never predicted has precision 0, not NaN.
  never = report.per_class_scores(np.array([[3, 0], [1, 0]]), ("a", "b"))
  assert never[1]["precision"] == 0.0 and never[1]["f1"] == 0.0
  np.testing.assert_allclose(report.row_normalise(np.array([[1, 3], [0, 0]])),
                             [[0.25, 0.75], [0.0, 0.0]])


def test_epoch_curves_weight_rows_by_steps():
  rows = [
      {"step": 3, "split": "train", "epoch": 1, "loss": 1.0, "accuracy": 0.4,
       "learning_rate": 0.1},
      {"step": 4, "split": "train", "epoch": 1, "loss": 9.0, "accuracy": 0.0,
       "learning_rate": 0.1},  # Redone after a resume: the row below replaces it.
      {"step": 4, "split": "train", "epoch": 1, "loss": 2.0, "accuracy": 0.8,
       "learning_rate": 0.05},
      {"step": 4, "split": "val", "epoch": 1, "loss": 1.5, "accuracy": 0.6},
      {"step": 8, "split": "train", "epoch": 2, "loss": 0.5, "accuracy": 0.9,
       "learning_rate": 0.01},
  ]
  curves = report.epoch_curves(rows)
  assert curves["train_epoch"] == [1, 2]
  assert curves["train_loss"] == pytest.approx([(3 * 1.0 + 2.0) / 4, 0.5])
  assert curves["train_accuracy"] == pytest.approx([(3 * 0.4 + 0.8) / 4, 0.9])
  assert curves["val_loss"] == [1.5] and curves["val_epoch"] == [1]
  assert curves["learning_rate"] == [0.1, 0.05, 0.01]


@pytest.mark.slow
def test_report_writes_every_file(run, evaluation, tmp_path, capsys):
  workdir, _ = run
  evaluation, meta = evaluation
  assert report_cli.main(["--workdir", workdir, "--step", str(meta.step), "--top-k", "5",
                          "--no-progress"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  report_dir = os.path.join(workdir, "report")
  assert out[-1] == report_dir
  for name in ("disc", "stripes", "macro avg"):
    assert any(line.strip().startswith(name) for line in out)
  for name in ("curves.png", "confusion_matrix.png", "reliability.png",
               "top_losses.png"):
    with Image.open(os.path.join(report_dir, name)) as img:
      assert img.format == "PNG" and min(img.size) >= 200
  with open(os.path.join(report_dir, "per_class.csv")) as f:
    lines = f.read().splitlines()
  assert lines[0] == "class,precision,recall,f1,support"
  assert [line.split(",")[0] for line in lines[1:]] == [
      "disc", "stripes", "macro avg", "weighted avg"]
  summary = json.load(open(os.path.join(report_dir, "report.json")))
  assert summary["accuracy"] == summary["recorded_accuracy"] == evaluation.accuracy
  assert len(summary["top_losses"]) == min(5, int(np.sum(
      evaluation.predictions != evaluation.labels)))
  assert summary["ece"] == pytest.approx(report.expected_calibration_error(
      evaluation.probabilities, evaluation.labels))
  page = open(os.path.join(report_dir, "index.html"), encoding="utf-8").read()
  sources = [s.split("'")[0] for s in page.split("src='")[1:]]
  assert {"curves.png", "confusion_matrix.png", "reliability.png"} <= set(sources)
  thumbnails = [s for s in sources if s.startswith("top_losses/")]
  assert len(thumbnails) == len(summary["top_losses"])
  for source in sources:  # Relative, so the folder reads offline and copies whole.
    assert not os.path.isabs(source) and "://" not in source
    assert os.path.getsize(os.path.join(report_dir, source)) > 0
  for item in summary["top_losses"]:
    assert item["path"] in page
  assert f"{summary['ece']:.4f}" in page


def _events(workdir):
  """(step, tag, value) from the TensorBoard files, read without TensorFlow."""
  from tensorboardX.proto import event_pb2
  found = []
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):  # TFRecord: length, crc, payload, crc.
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("image"):
          found.append((event.step, value.tag, value.image.encoded_image_string))
        else:
          found.append((event.step, value.tag, value.simple_value))
  return found


@pytest.mark.slow
def test_tensorboard_has_scalars_and_an_augmented_grid(run):
  workdir, last = run
  events = _events(workdir)
  tags = {tag for _, tag, _ in events}
  assert {"train/loss", "train/accuracy", "train/learning_rate", "train/images_per_sec",
          "val/loss", "val/accuracy"} <= tags
  val_accuracy = [v for step, tag, v in events if tag == "val/accuracy"]
  assert val_accuracy == [pytest.approx(last.last_epoch.val_accuracy, abs=1e-6)]
  grids = [(step, v) for step, tag, v in events if tag == "train/augmented_images"]
  assert len(grids) == 1 and grids[0][0] == 0
  grid = np.asarray(Image.open(io.BytesIO(grids[0][1])))
  assert grid.shape == (4 * 18 + 2, 4 * 18 + 2, 3)  # 16 tiles of 16 px, 2 px gaps.
  tiles = [grid[2 + r * 18:18 + r * 18, 2 + c * 18:18 + c * 18]
           for r in range(4) for c in range(4)]
  assert all(tile.std() > 5 for tile in tiles)  # Pictures, not blank tiles.
  assert not any(np.array_equal(tiles[0], t) for t in tiles[1:])


def test_image_grid_places_and_clips():
  images = np.zeros((3, 2, 2, 3), np.float32)
  images[0] = 255.6
  images[2] = 7.4
  grid = metric_writers.image_grid(images, columns=2, pad=1)
  assert grid.shape == (7, 7, 3) and grid.dtype == np.uint8
  assert (grid[1:3, 1:3] == 255).all() and (grid[4:6, 1:3] == 7).all()
  assert (grid[1:3, 4:6] == 0).all() and grid[0].max() == 0
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    metric_writers.image_grid(np.zeros((2, 2, 3)))


@pytest.mark.slow
def test_figures_for_many_classes_and_no_mistakes(tmp_path):
  rng = np.random.default_rng(0)
  names = [f"class_{i:02d}" for i in range(30)]  # Too many for numbers in the cells.
  report.plot_confusion(rng.integers(0, 9, (30, 30)), names, str(tmp_path / "cm.png"))
  report.plot_top_losses([], [], str(tmp_path / "top.png"))
  cal = report.calibration(rng.uniform(0.5, 1, 50), rng.integers(0, 2, 50), bins=10)
  report.plot_reliability(cal, str(tmp_path / "rel.png"))
  for name in ("cm.png", "top.png", "rel.png"):
    with Image.open(tmp_path / name) as img:
      assert img.format == "PNG"
  with Image.open(tmp_path / "cm.png") as img:
    assert img.size[0] > 1500  # The figure grows with the class count.


def test_report_without_checkpoints_says_so(tmp_path, capsys):
  assert report_cli.main(["--workdir", str(tmp_path), "--no-progress"]) == 2
  assert capsys.readouterr().err.startswith(f"error: No checkpoints in '{tmp_path}'")


def _zip_of(folder: str, archive: str) -> str:
  with zipfile.ZipFile(archive, "w") as zf:
    for root, _, files in os.walk(folder):
      for name in files:
        path = os.path.join(root, name)
        zf.write(path, os.path.join("Shapes", os.path.relpath(path, folder)))
  return archive


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "zip", "generated", "tfds"])
def test_report_reads_its_pictures_through_every_kind_of_source(kind, shapes_dir, tmp_path,
                                                                make_config, request):
  """The top-loss pictures come from the source itself: a file, a zip member, a TFDS
  record. A model with random weights makes enough mistakes to fill the gallery."""
  spec = {"folder": f"folder:{shapes_dir}", "generated": "generated:shapes",
          "zip": "zip:" + _zip_of(shapes_dir, str(tmp_path / "shapes.zip")),
          "tfds": "tfds:cats_vs_dogs"}[kind]
  overrides = {"data.generated_per_class": 20}
  if kind == "tfds":
    request.getfixturevalue("mock_cats_vs_dogs")
    overrides.update({"data.train_split": "train[:50%]", "data.val_split": "train[50%:]"})
  config = make_config(spec, **overrides)
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  dataset = sources.build_dataset(config.data, config.seed, workdir)
  write_random_workdir(workdir, config, dataset.class_names, step=3)
  summary = report.build_report(workdir, top_k=4, progress=False)
  assert summary["count"] == len(dataset.val)
  top = summary["top_losses"]
  assert len(top) == min(4, round((1 - summary["accuracy"]) * summary["count"])) >= 1
  original = getattr(dataset.val, "source", dataset.val)
  for rank, item in enumerate(top):
    with Image.open(os.path.join(summary["report_dir"], "top_losses",
                                 f"{rank:03d}.png")) as thumb:
      expected = preprocess.decode(original[item["index"]]["data"],
                                   draft_size=report.THUMBNAIL_SIZE)
      expected.thumbnail((report.THUMBNAIL_SIZE,) * 2, Image.Resampling.BILINEAR)
      assert thumb.size == expected.size
      np.testing.assert_array_equal(np.asarray(thumb.convert("RGB")), np.asarray(expected))


@pytest.mark.slow
def test_time_to_accuracy_counts_across_a_resume(tmp_path, capsys):
  """Every val row has the run's wall time; a resumed run's clock continues from its
  checkpoint's; the report's first times are those of metrics.jsonl's rows."""
  workdir = str(tmp_path / "run")
  config = tiny_config("generated:shapes", num_epochs=2, **{
      "data.generated_per_class": 40, "optim.schedule": "constant"})
  train.train_and_evaluate(config, workdir)
  first_session = [r["time"] for r in metric_writers.read_metrics(workdir)
                   if r["split"] == "val"]
  mngr = checkpoint.manager(workdir, 3)
  saved = workdir_lib.read_meta(mngr, mngr.latest_step()).progress.elapsed_seconds
  mngr.close()
  config.num_epochs = 3
  train.train_and_evaluate(config, workdir)  # Resumes at epoch 2's checkpoint.
  val = [r for r in metric_writers.read_metrics(workdir) if r["split"] == "val"]
  times = [r["time"] for r in val]
  assert [r["epoch"] for r in val] == [1, 2, 3] and times[:2] == first_session
  assert 0 < times[0] < times[1] <= saved < times[2]
  accuracies = sorted({r["accuracy"] for r in val})
  targets = accuracies  # Each reached at some epoch.
  out_dir = str(tmp_path / "report")
  assert report_cli.main(["--workdir", workdir, "--out", out_dir, "--top-k", "2",
                          "--no-progress", "--targets", ",".join(map(repr, targets))]) == 0
  printed = capsys.readouterr().out
  with Image.open(os.path.join(out_dir, "time_to_accuracy.png")) as img:
    assert img.format == "PNG" and min(img.size) >= 200
  curve = json.load(open(os.path.join(out_dir, "report.json")))["time_to_accuracy"]
  assert curve["time"] == times and curve["step"] == [r["step"] for r in val]
  for target in accuracies:
    first = next(r for r in val if r["accuracy"] >= target)
    assert curve["reached"][repr(target)] == {
        "time": first["time"], "step": first["step"], "epoch": first["epoch"],
        "accuracy": first["accuracy"]}
    assert (f"time to validation accuracy {target:g}: "
            f"{report.format_seconds(first['time'])} (step {first['step']}, epoch "
            f"{first['epoch']})") in printed
  never = report.time_to_accuracy(val, (1.01,))
  assert never["reached"] == {"1.01": None} and never["time"] == times
  assert report.time_to_accuracy_lines({"time_to_accuracy": never}) == [
      ("time to validation accuracy 1.01", "not reached")]
  assert "src='time_to_accuracy.png'" in open(os.path.join(out_dir, "index.html")).read()


def test_report_targets_flag_rejects_a_bad_accuracy(capsys):
  with pytest.raises(SystemExit) as exit_:
    report_cli.main(["--workdir", "w", "--targets", "0.9,95"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (
      "error: argument --targets: '0.9,95' is not accuracies in (0, 1], comma-separated, "
      "e.g. 0.9,0.95 (see jaxcls-report --help)\n")


def test_format_seconds():
  assert [report.format_seconds(s) for s in (42.04, 725.9, 7391.0)] == [
      "42.0 s", "12 min 05 s", "2 h 03 min"]
