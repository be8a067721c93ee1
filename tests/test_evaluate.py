"""Evaluation on held-out data (jaxcls.evaluate, jaxcls-evaluate, sources.build_held_out).

Two float32 computations of the same model (evaluation's batches against the Predictor's,
8 pmapped devices against one jit) differ by rounding alone: per image, logits
`TINY_CNN_FORWARD`·‖z‖ apart at most (tests/numerics.py). A cross-entropy
`logsumexp(z) − z_y` moves by at most twice a logit's change, and an argmax can only
differ where the top two logits are closer than twice it; `numerics.mean_loss_bound` and
`numerics.ambiguous_argmax` turn that into the bounds the comparisons below use.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, tiny_config
from jaxcls import evaluate, metric_writers, report, train
from jaxcls.benchmark.predict import write_random_workdir
from jaxcls.cli import evaluate as evaluate_cli
from jaxcls.data import preprocess, sources
from jaxcls.serve import Predictor
from numerics import ambiguous_argmax, mean_loss_bound

MODEL_CLASSES = ("disc", "stripes")


# --- Held-out sets from the registry (no model) ---------------------------------------


def _png(color=(200, 30, 30), size=(20, 20)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, format="PNG")
  return buffer.getvalue()


BROKEN = {"empty.jpg": b"", "text.jpg": b"plain text, named .jpg\n",
          "truncated.png": _png()[:40]}


def _reason(data: bytes) -> str:
  with pytest.raises(preprocess.ImageError) as raised:
    preprocess.load_image(data, 16)
  return raised.value.reason


@pytest.fixture
def held_out_dir(tmp_path, shapes_dir):
  """shapes_dir's stripes only (a subset of the model's classes), plus broken files."""
  root = tmp_path / "held_out"
  shutil.copytree(os.path.join(shapes_dir, "stripes"), root / "stripes")
  for name, data in BROKEN.items():
    (root / "stripes" / name).write_bytes(data)
  return str(root)


def test_a_folder_is_listed_whole_without_a_split(shapes_dir, make_config):
  config = make_config(f"folder:{shapes_dir}")
  held = sources.build_held_out(f"folder:{shapes_dir}", config.data)
  listed, names = sources.list_folder(shapes_dir)
  assert held.source.paths == listed.paths and len(held.source) == 132
  assert held.source.labels == listed.labels and held.class_names == names == MODEL_CLASSES
  assert held.skipped == ()
  dataset = sources.build_dataset(config.data, config.seed)  # Training splits the same.
  assert sorted(held.source.paths) == sorted(dataset.train.paths + dataset.val.paths)


def test_labels_are_the_models_indices_matched_by_name(shapes_dir, held_out_dir,
                                                       make_config):
  data = make_config("folder:x").data
  held = sources.build_held_out(f"folder:{held_out_dir}", data,
                                class_names=MODEL_CLASSES)
  assert held.data_class_names == ("stripes",) and held.class_names == MODEL_CLASSES
  assert set(held.source.labels) == {1} and held.source[0]["label"] == 1
  # The model's classes in another order (a TFDS ClassLabel, say): labels follow names.
  flipped = sources.build_held_out(f"folder:{shapes_dir}", data,
                                   class_names=("stripes", "disc"))
  plain = sources.build_held_out(f"folder:{shapes_dir}", data)
  assert flipped.source.paths == plain.source.paths
  assert flipped.source.labels == tuple(1 - label for label in plain.source.labels)
  assert [flipped.source[i]["label"] for i in (0, 131)] == [1, 0]
  assert flipped.source.identity != plain.source.identity


def test_broken_files_are_skipped_and_listed_exactly(held_out_dir, make_config):
  held = sources.build_held_out(f"folder:{held_out_dir}", make_config("folder:x").data,
                                class_names=MODEL_CLASSES)
  expected = tuple({"path": os.path.join(held_out_dir, "stripes", name),
                    "reason": _reason(BROKEN[name])} for name in sorted(BROKEN))
  assert held.skipped == expected
  assert len(held.source) == 66
  assert not set(BROKEN) & {os.path.basename(p) for p in held.source.paths}


def test_an_unknown_class_folder_is_named_before_anything_is_decoded(
    held_out_dir, make_config, tmp_path, monkeypatch):
  os.makedirs(os.path.join(held_out_dir, "zebra"))
  shutil.copy(os.path.join(held_out_dir, "stripes", "stripes_0000.jpg"),
              os.path.join(held_out_dir, "zebra"))
  monkeypatch.setattr(preprocess, "load_image", lambda *a: pytest.fail("decoded"))
  with pytest.raises(sources.DataError) as raised:
    sources.build_held_out(f"folder:{held_out_dir}", make_config("folder:x").data,
                           class_names=MODEL_CLASSES, cache_dir=str(tmp_path))
  assert str(raised.value) == (
      f"data 'folder:{held_out_dir}' holds classes the model was not trained on: 'zebra'. "
      "The model knows 'disc', 'stripes'; labels are matched by class name, so rename "
      "those class folders to the model's names or remove them.")


def test_an_unknown_class_error_of_an_imagenet_model_stays_one_short_line():
  from jaxcls.data.sources.held_out import class_mapping
  model_classes = [f"class_{i}" for i in range(1000)]
  with pytest.raises(sources.DataError) as raised:
    class_mapping(["cat", "dog", "class_7"], model_classes, "folder:pets")
  assert str(raised.value) == (
      "data 'folder:pets' holds classes the model was not trained on: 'cat', 'dog'. The "
      "model knows 'class_0', 'class_1', 'class_2', 'class_3', 'class_4', 'class_5', "
      "'class_6', 'class_7', … (1000 in all); labels are matched by class name, so rename "
      "those class folders to the model's names or remove them.")
  assert class_mapping(["class_7", "class_999"], model_classes, "folder:pets") == (7, 999)


@pytest.mark.parametrize("spec, split, message", [
    ("folder:{dir}", "test", "data 'folder:{dir}' is evaluated whole; a split ('test') "
                             "applies only to tfds: sets. Leave the split out."),
    ("tfds:cats_vs_dogs", None, "data 'tfds:cats_vs_dogs' needs a split to evaluate, e.g. "
                                "test or train[80%:]."),
    ("generated:shapes", None, "data 'generated:shapes' is not understood. Use "
                               "folder:PATH (one subfolder per class), zip:PATH (the same "
                               "inside a .zip) or tfds:NAME with a split (held-out kinds: "
                               "folder, tfds, zip)."),
    ("{dir}", None, "data '{dir}' is not understood. Use folder:PATH"),
])
def test_the_kind_and_the_split_are_checked(spec, split, message, shapes_dir, make_config):
  spec, message = spec.format(dir=shapes_dir), message.format(dir=shapes_dir)
  with pytest.raises(sources.DataError) as raised:
    sources.build_held_out(spec, make_config("folder:x").data, split=split)
  assert str(raised.value).startswith(message)
  if spec == shapes_dir:
    assert str(raised.value).endswith(f" For this folder: folder:{shapes_dir}.")


# --- Numbers by hand ------------------------------------------------------------------


def _hand_result() -> evaluate.HeldOutResult:
  """Five images of a 4-class model: labels a a a c c, predicted a b a c a."""
  labels = np.array([0, 0, 0, 2, 2])
  predicted = np.array([0, 1, 0, 2, 0])
  logits = np.full((5, 4), -2.0, np.float32)
  logits[np.arange(5), predicted] = 1.0
  losses = -np.log(np.exp(logits[np.arange(5), labels]) / np.exp(logits).sum(-1))
  evaluation = report.Evaluation("/data", tuple(f"x/{i}.jpg" for i in range(5)),
                                 ("a", "b", "c", "d"), labels, logits,
                                 losses.astype(np.float32))
  return evaluate.HeldOutResult("/w", 12, 2, "the best checkpoint: step 12", "folder:/data",
                                None, ("a", "c"), ({"path": "/data/a/bad.jpg",
                                                    "reason": "0 bytes"},), evaluation)


def test_per_class_scores_by_hand():
  rows = {r["class"]: r for r in _hand_result().scores}
  # d is neither present nor predicted: no row. b is predicted once, never present.
  assert list(rows) == ["a", "b", "c", "macro avg", "weighted avg"]
  assert rows["a"] == {"class": "a", "precision": pytest.approx(2 / 3),
                       "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3),
                       "support": 3}
  assert rows["b"] == {"class": "b", "precision": 0.0, "recall": 0.0, "f1": 0.0,
                       "support": 0}
  assert rows["c"]["precision"] == 1.0 and rows["c"]["recall"] == 0.5
  assert rows["c"]["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5) and rows["c"]["support"] == 2
  assert rows["macro avg"]["precision"] == pytest.approx((2 / 3 + 0 + 1) / 3)
  assert rows["macro avg"]["recall"] == pytest.approx((2 / 3 + 0 + 0.5) / 3)
  assert rows["weighted avg"]["recall"] == pytest.approx(3 / 5)  # = accuracy.
  assert rows["weighted avg"]["support"] == 5


def test_json_shape():
  result = _hand_result()
  row = json.loads(json.dumps(result.to_json()))
  assert list(row) == ["workdir", "step", "epoch", "checkpoint", "data", "split",
                       "data_root", "class_names", "data_class_names", "count",
                       "accuracy", "loss", "per_class", "confusion_matrix", "skipped"]
  assert row["count"] == 5 and row["accuracy"] == 0.6 and row["split"] is None
  assert row["loss"] == pytest.approx(float(np.mean(result.evaluation.losses)))
  assert row["class_names"] == ["a", "b", "c", "d"] and row["data_class_names"] == ["a", "c"]
  assert row["confusion_matrix"] == [[2, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0],
                                     [0, 0, 0, 0]]
  assert row["per_class"] == result.scores
  assert row["skipped"] == [{"path": "/data/a/bad.jpg", "reason": "0 bytes"}]


def test_the_console_script_is_declared():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert scripts["jaxcls-evaluate"] == "jaxcls.cli.evaluate:cli"
  assert callable(evaluate_cli.cli)


def test_an_unwritable_report_folder_fails_before_any_work(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  assert evaluate_cli.main(["--workdir", str(tmp_path / "none"), "--data", "folder:x",
                            "--report", str(tmp_path / "file" / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: cannot write --report '{tmp_path / 'file' / 'out'}' (")
  assert len(err.splitlines()) == 1


# --- A trained model on held-out data -------------------------------------------------


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
  """Two epochs of the tiny CNN on shapes_dir: checkpoints at steps 6 and 12, each with
  its validation row in metrics.jsonl; and a folder holding exactly its validation
  files."""
  workdir = str(tmp_path_factory.mktemp("evaluate_run"))
  config = tiny_config(f"folder:{shapes_dir}", num_epochs=2)
  train.train_and_evaluate(config, workdir)
  dataset = sources.build_dataset(config.data, config.seed)
  val_dir = str(tmp_path_factory.mktemp("validation_files"))
  for path in dataset.val.paths:
    os.makedirs(os.path.dirname(os.path.join(val_dir, path)), exist_ok=True)
    shutil.copy(os.path.join(dataset.val.root, path), os.path.join(val_dir, path))
  return workdir, val_dir, dataset


def _recorded_val(workdir: str, step: int) -> dict:
  rows = [r for r in metric_writers.read_metrics(workdir)
          if r["split"] == "val" and r["step"] == step]
  assert len(rows) == 1, rows
  return rows[0]


def _run_cli(args, capsys) -> tuple[int, str, str]:
  status = evaluate_cli.main(args + ["--no-progress"])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.parametrize("step", [6, None])  # The first epoch's, and the best (default).
def test_the_validation_files_give_the_accuracy_training_recorded(trained, step, capsys):
  """The issue's "done when": a folder holding exactly a run's validation files gives
  the accuracy its evaluation wrote to metrics.jsonl, at that checkpoint."""
  workdir, val_dir, dataset = trained
  before = sorted(os.listdir(workdir))
  args = ["--workdir", workdir, "--data", f"folder:{val_dir}", "--json"]
  status, out, _ = _run_cli(args + (["--step", str(step)] if step else []), capsys)
  assert status == 0
  row = json.loads(out)
  recorded = _recorded_val(workdir, row["step"])
  assert row["step"] == step if step else row["step"] in (6, 12)
  assert row["count"] == recorded["count"] == len(dataset.val)
  result = evaluate.evaluate(workdir, f"folder:{val_dir}", step=row["step"], progress=False)
  logits, losses = result.evaluation.logits, result.evaluation.losses
  # Training evaluated on 8 pmapped devices, 2 images each: predictions can only differ
  # on images whose top two logits are within rounding of each other.
  slack = int(np.sum(ambiguous_argmax(logits)))
  assert abs(row["accuracy"] - recorded["accuracy"]) * row["count"] <= slack + 1e-9
  assert abs(row["loss"] - recorded["loss"]) <= mean_loss_bound(logits, losses)
  assert sorted(os.listdir(workdir)) == before  # Nothing written into the workdir.


@pytest.mark.slow
def test_step_picks_the_checkpoint(trained, capsys):
  workdir, val_dir, _ = trained
  rows = {}
  for step in ("6", "12"):
    status, out, err = _run_cli(["--workdir", workdir, "--data", f"folder:{val_dir}",
                                 "--json", "--step", step], capsys)
    assert status == 0 and err.startswith(f"Evaluated the requested checkpoint: step {step}")
    rows[step] = json.loads(out)
  assert rows["6"]["step"] == 6 and rows["12"]["step"] == 12
  assert rows["6"]["loss"] != rows["12"]["loss"]
  status, _, err = _run_cli(["--workdir", workdir, "--data", f"folder:{val_dir}",
                             "--step", "7"], capsys)
  assert status == 2 and err == f"error: No checkpoint at step 7 in '{workdir}'; have [6, 12].\n"


def _check_against(result, probabilities: np.ndarray, labels: np.ndarray) -> None:
  """Accuracy and loss of `result` against the Predictor's probabilities of every
  image, computed here: argmax and mean −log p(true class)."""
  evaluation = result.evaluation
  assert list(evaluation.labels) == list(labels)
  predicted = np.argmax(probabilities, axis=-1)
  sure = ~ambiguous_argmax(evaluation.logits)
  np.testing.assert_array_equal(evaluation.predictions[sure], predicted[sure])
  correct = int(np.sum(predicted == labels))
  assert abs(evaluation.accuracy * len(labels) - correct) <= np.sum(~sure) + 1e-9
  picked = np.asarray(probabilities, np.float64)[np.arange(len(labels)), labels]
  assert abs(evaluation.loss - float(np.mean(-np.log(picked)))) <= mean_loss_bound(
      evaluation.logits, evaluation.losses)


@pytest.mark.slow
def test_a_folder_gives_the_predictors_accuracy_and_loss_over_every_image(
    trained, shapes_dir):
  workdir, _, _ = trained
  result = evaluate.evaluate(workdir, f"folder:{shapes_dir}", progress=False)
  assert result.evaluation.root == shapes_dir and len(result.evaluation.labels) == 132
  files = [os.path.join(shapes_dir, p) for p in result.evaluation.paths]
  labels = np.array([MODEL_CLASSES.index(p.split("/")[0]) for p in result.evaluation.paths])
  assert sorted(files) == sorted(os.path.join(d, f) for d, _, fs in os.walk(shapes_dir)
                                 for f in fs)
  predictions = Predictor.from_workdir(workdir, tta=False).predict_files(files)
  assert all(p.ok for p in predictions)
  _check_against(result, np.array([[p.probabilities[c] for c in MODEL_CLASSES]
                                   for p in predictions]), labels)


@pytest.mark.slow
def test_a_zip_gives_what_the_same_folder_gives(trained, shapes_dir, tmp_path, capsys):
  workdir, _, _ = trained
  archive = str(tmp_path / "held_out.zip")
  with zipfile.ZipFile(archive, "w") as zf:
    for folder, _, names in os.walk(shapes_dir):
      for name in names:
        path = os.path.join(folder, name)
        zf.write(path, "Shapes/" + os.path.relpath(path, shapes_dir))
  rows = {}
  for spec in (f"folder:{shapes_dir}", f"zip:{archive}"):
    status, out, _ = _run_cli(["--workdir", workdir, "--data", spec, "--json"], capsys)
    assert status == 0
    rows[spec] = json.loads(out)
  folder, zipped = rows.values()
  assert zipped["data_root"] == os.path.join(archive, "Shapes")
  # The same images in the same order through the same program: the same numbers.
  for key in ("count", "accuracy", "loss", "per_class", "confusion_matrix"):
    assert zipped[key] == folder[key], key


@pytest.mark.slow
def test_a_tfds_split_gives_the_predictors_numbers_over_every_record(
    mock_cats_vs_dogs, make_config, tmp_path, capsys):
  import tensorflow_datasets as tfds
  workdir = str(tmp_path / "w")
  write_random_workdir(workdir, make_config("tfds:cats_vs_dogs"), ("cat", "dog"), step=3)
  result = evaluate.evaluate(workdir, "tfds:cats_vs_dogs", split="train[50%:]",
                             progress=False)
  records = tfds.data_source("cats_vs_dogs", split="train[50%:]", download=False,
                             decoders={"image": tfds.decode.SkipDecoding()})
  assert len(result.evaluation.labels) == len(records) == 32
  assert result.evaluation.paths[0] == "train[50%:][0]" and result.skipped == ()
  predictor = Predictor.from_workdir(workdir, tta=False)
  images = [records[i]["image"] for i in range(len(records))]  # Encoded bytes.
  labels = np.array([int(records[i]["label"]) for i in range(len(records))])
  assert set(labels) == {0, 1}
  probabilities, _ = predictor.predict_arrays(
      np.stack([preprocess.load_image(image, predictor.image_size) for image in images]))
  _check_against(result, probabilities, labels)
  evaluation = result.evaluation
  status, out, _ = _run_cli(["--workdir", workdir, "--data", "tfds:cats_vs_dogs",
                             "--split", "train[50%:]", "--json"], capsys)
  row = json.loads(out)
  assert status == 0 and row["split"] == "train[50%:]" and row["count"] == 32
  assert row["accuracy"] == evaluation.accuracy and row["loss"] == evaluation.loss


@pytest.mark.slow
def test_text_output_lists_skipped_files_and_the_scores(trained, held_out_dir, capsys):
  workdir, _, _ = trained
  status, out, err = _run_cli(["--workdir", workdir, "--data", f"folder:{held_out_dir}"],
                              capsys)
  assert status == 0
  result = evaluate.evaluate(workdir, f"folder:{held_out_dir}", progress=False)
  evaluation = result.evaluation
  lines = out.splitlines()
  assert lines[0] == (f"folder:{held_out_dir}: 66 images, accuracy "
                      f"{evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}, "
                      "3 file(s) skipped")
  assert lines[1:] == report.format_table(result.scores).splitlines()
  assert [line.split()[0] for line in lines[2:]][-2:] == ["macro", "weighted"]
  skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
  assert skipped == [f"skipped: {os.path.join(held_out_dir, 'stripes', name)}: "
                     f"{_reason(BROKEN[name])}" for name in sorted(BROKEN)]


@pytest.mark.slow
def test_the_report_folder_is_written_for_the_held_out_set(trained, held_out_dir,
                                                           tmp_path, capsys):
  workdir, _, _ = trained
  out_dir = str(tmp_path / "report")
  status, out, _ = _run_cli(["--workdir", workdir, "--data", f"folder:{held_out_dir}",
                             "--json", "--report", out_dir, "--top-k", "4"], capsys)
  assert status == 0
  row = json.loads(out)
  assert row["report_dir"] == out_dir
  with open(os.path.join(out_dir, "skipped_files.jsonl")) as f:
    assert [json.loads(line) for line in f] == row["skipped"]
  assert len(row["skipped"]) == 3
  for name in ("confusion_matrix.png", "reliability.png", "top_losses.png"):
    with Image.open(os.path.join(out_dir, name)) as img:
      assert img.format == "PNG"
  assert not os.path.exists(os.path.join(out_dir, "curves.png"))  # Training's, not this.
  summary = json.load(open(os.path.join(out_dir, "report.json")))
  assert summary["subset"] == "held-out" and summary["data"] == f"folder:{held_out_dir}"
  for key in ("count", "accuracy", "loss", "per_class", "skipped", "step"):
    assert summary[key] == row[key], key
  assert "recorded_accuracy" not in summary
  wrong = round((1 - row["accuracy"]) * row["count"])
  assert len(summary["top_losses"]) == min(4, wrong)
  for item in summary["top_losses"]:
    assert item["true"] == "stripes" and item["predicted"] == "disc"
  with open(os.path.join(out_dir, "per_class.csv")) as f:
    assert [line.split(",")[0] for line in f.read().splitlines()] == [
        "class", *(r["class"] for r in row["per_class"])]
  page = open(os.path.join(out_dir, "index.html"), encoding="utf-8").read()
  assert "<th>held-out images</th><td>66</td>" in page
  assert "<th>files skipped (cannot be decoded)</th><td>3</td>" in page
  assert "validation" not in page


@pytest.mark.slow
def test_an_unknown_class_folder_is_one_error_line(trained, held_out_dir, capsys):
  workdir, _, _ = trained
  os.makedirs(os.path.join(held_out_dir, "zebra"))
  with open(os.path.join(held_out_dir, "zebra", "z.png"), "wb") as f:
    f.write(_png())
  status, out, err = _run_cli(["--workdir", workdir, "--data", f"folder:{held_out_dir}"],
                              capsys)
  assert status == 2 and out == ""
  assert err == (f"error: data 'folder:{held_out_dir}' holds classes the model was not "
                 "trained on: 'zebra'. The model knows 'disc', 'stripes'; labels are "
                 "matched by class name, so rename those class folders to the model's "
                 "names or remove them.\n")


@pytest.mark.slow
def test_the_program_lists_its_flags():
  result = subprocess.run([sys.executable, "-m", "jaxcls.cli.evaluate", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr
  for flag in ("--workdir", "--data", "--split", "--step", "--json", "--report",
               "--batch-size", "--top-k", "--bins"):
    assert flag in result.stdout, flag
