"""What a run reports beyond metrics.jsonl: callbacks with every step's and epoch's
metrics, the weight average (EMA) evaluated and checkpointed, TensorBoard's
hyperparameter table, and Weights & Biases (offline)."""

import glob
import json

import jax
import numpy as np
import pytest

from conftest import tiny_config
from numerics import TINY_CNN_FORWARD, assert_normwise_close
from jaxcls import metric_writers, train, tracking, workdir
from jaxcls.serve import Predictor

pytestmark = pytest.mark.slow  # Trains.


class Recorder(tracking.Callback):
  def __init__(self):
    self.steps, self.epochs, self.ends = [], [], []

  def on_step(self, step, metrics):
    self.steps.append((step, dict(metrics)))

  def on_epoch(self, epoch, metrics):
    self.epochs.append((epoch, dict(metrics)))

  def on_end(self, summary):
    self.ends.append(summary)


@pytest.fixture(scope="module")
def run(shapes_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("tracked")
  config = tiny_config(f"folder:{shapes_dir}", num_epochs=2, **{
      "optim.ema_decay": 0.9, "train.wandb_project": "jaxcls-tests"})
  recorder = Recorder()
  with pytest.MonkeyPatch.context() as patch:  # W&B offline, its files in the test's folder.
    for name, value in dict(WANDB_MODE="offline", WANDB_DIR=str(root),
                            WANDB_SILENT="true").items():
      patch.setenv(name, value)
    state, summary = train.train_and_evaluate(config, str(root / "w"),
                                              callbacks=[recorder])
  return root, state, summary, recorder


def test_callbacks_get_every_step_every_epoch_and_the_end(run):
  _, _, summary, recorder = run
  steps = summary.final_step
  assert [step for step, _ in recorder.steps] == list(range(1, steps + 1))
  rows = {r["step"]: r for r in metric_writers.read_metrics(run[0] / "w")
          if r["split"] == "train"}
  # Each logged row is the mean of the steps it covers: the callback saw those steps.
  for step, row in rows.items():
    covered = [m["loss"] for s, m in recorder.steps if step - 2 < s <= step]
    assert row["loss"] == pytest.approx(np.mean(covered), rel=1e-6)
  assert [epoch for epoch, _ in recorder.epochs] == [1, 2]
  assert recorder.epochs[-1][1]["val_accuracy"] == summary.last_epoch.val_accuracy
  assert recorder.ends == [summary]


def test_the_weight_average_is_evaluated_and_checkpointed(run):
  root, state, summary, _ = run
  ema_rows = [r for r in metric_writers.read_metrics(root / "w") if r["split"] == "val_ema"]
  assert [r["epoch"] for r in ema_rows] == [1, 2]
  assert summary.last_epoch.val_ema_accuracy == ema_rows[-1]["accuracy"]
  raw = Predictor.from_workdir(str(root / "w"), step=summary.final_step)
  ema = Predictor.from_workdir(str(root / "w"), step=summary.final_step, weights="ema")
  assert ema.checkpoint_description.endswith(", its weight average")
  for got, want in zip(jax.tree.leaves(ema.variables), jax.tree.leaves(state.ema)):
    np.testing.assert_array_equal(got, want)
  assert not np.array_equal(ema.variables["params"]["head"]["kernel"],
                            raw.variables["params"]["head"]["kernel"])


def test_a_run_without_an_average_says_so(predict_workdir):
  with pytest.raises(workdir.WeightsChoiceError, match="kept no weight average"):
    Predictor.from_workdir(predict_workdir, weights="ema")


def test_tensorboard_gets_the_hyperparameter_table(run):
  from tensorboardX.proto import event_pb2
  from tensorboardX.proto import plugin_hparams_pb2
  files = glob.glob(str(run[0] / "w" / "tensorboard" / "hparams" / "events.*"))
  assert len(files) == 1
  data, pos, infos = open(files[0], "rb").read(), 0, []
  while pos < len(data):  # TFRecord: length, crc, payload, crc.
    length = int.from_bytes(data[pos:pos + 8], "little")
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == "hparams":
        infos.append(plugin_hparams_pb2.HParamsPluginData.FromString(
            value.metadata.plugin_data.content))
  starts = [i.session_start_info for i in infos if i.HasField("session_start_info")]
  assert starts and starts[0].hparams["optim.ema_decay"].number_value == 0.9
  assert starts[0].hparams["model.name"].string_value == "cnn"


def _wandb_records(path: str):
  """The protobuf records of an offline run's transaction log: a 7-byte file header,
  then LevelDB's log format (32 KiB blocks; each piece has a 4-byte checksum, a 2-byte
  length and a type: 1 whole, 2 first, 3 middle, 4 last)."""
  from wandb.proto import wandb_internal_pb2
  data, pos, pieces = open(path, "rb").read(), 7, b""
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # A block's tail too short for a header: padding.
      pos += 32768 - pos % 32768
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    pieces += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pieces)
      pieces = b""
      yield record


def _key(item) -> str:
  return item.key or "/".join(item.nested_key)


def test_weights_and_biases_logs_offline(run):
  root, _, summary, recorder = run
  (path,) = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
  history, final = [], {}
  for record in _wandb_records(path):
    kind = record.WhichOneof("record_type")
    if kind == "history":
      history.append({_key(item): json.loads(item.value_json)
                      for item in record.history.item})
    elif kind == "summary":
      final.update({_key(item): json.loads(item.value_json)
                    for item in record.summary.update})
  logged_steps = [row["train/loss"] for row in history if "train/loss" in row]
  assert logged_steps == pytest.approx([m["loss"] for _, m in recorder.steps], rel=1e-6)
  assert [row["epoch"] for row in history if "epoch" in row] == [1, 2]
  assert final["final_step"] == summary.final_step
  assert final["val_accuracy"] == summary.last_epoch.val_accuracy


def test_predict_takes_the_weight_average_from_the_command_line(run, shapes_dir, capsys):
  from jaxcls.cli import predict as predict_cli
  root, _, summary, _ = run
  image = f"{shapes_dir}/disc/disc_0000.jpg"
  assert predict_cli.main(["--workdir", str(root / "w"), "--weights", "ema", "--json",
                           "--no-compilation-cache", image]) == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  expected = Predictor.from_workdir(str(root / "w"), weights="ema").predict_files([image])[0]
  assert row["label"] == expected.label
  # The CLI's batch of 1 is the API's too: the same program, the same numbers.
  assert row["probabilities"] == expected.probabilities


def test_evaluate_export_and_serve_take_the_weight_average(run, shapes_dir, tmp_path,
                                                           capsys):
  from jaxcls.cli import evaluate as evaluate_cli
  from jaxcls.cli import export as export_cli
  from jaxcls.cli import serve as serve_cli
  from jaxcls.serve import export as export_lib
  workdir = str(run[0] / "w")
  results = {}
  for weights in ("raw", "ema"):
    assert evaluate_cli.main(["--workdir", workdir, "--data", f"folder:{shapes_dir}",
                              "--weights", weights, "--json", "--no-progress",
                              "--no-compilation-cache"]) == 0
    results[weights] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert results["ema"]["checkpoint"].endswith(", its weight average")
  assert not results["raw"]["checkpoint"].endswith(", its weight average")
  assert results["ema"]["loss"] != results["raw"]["loss"]

  out = str(tmp_path / "ema.jaxexport")
  assert export_cli.main(["--workdir", workdir, "--weights", "ema", "--out", out,
                          "--platforms", "cpu"]) == 0
  exported, meta = export_lib.load(out)
  ema = Predictor.from_workdir(workdir, weights="ema")
  assert meta["source"]["checkpoint"] == ema.checkpoint_description
  images = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), np.uint8)
  assert_normwise_close(np.asarray(exported.call(images)), ema.predict_arrays(images)[0],
                        TINY_CNN_FORWARD)

  class Served(Exception):
    pass

  def create_app(predictor, **_):
    raise Served(predictor)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr("jaxcls.serve.server.create_app", create_app)
    with pytest.raises(Served) as served:
      serve_cli._serve(["--workdir", workdir, "--weights", "ema", "--port", "0",
                        "--no-compilation-cache"])
  for got, want in zip(jax.tree.leaves(served.value.args[0].variables),
                       jax.tree.leaves(ema.variables)):
    np.testing.assert_array_equal(got, want)
