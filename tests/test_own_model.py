"""A backbone registered in the user's own recipe (examples/my_model.py registers
'tiny_net'): trained, then loaded by every program that loads a workdir, in a process
where nothing has registered it; and one clear error line when the recipe has moved.

Each program runs in this process (a fresh process per program would cost a JAX start
and a compile each), with 'tiny_net' and the recipe's module removed from the registry
and sys.modules first: what a new process starts with. That the program's load put
them back, from the recorded file, is checked after each.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import ROOT
from jaxcls import checkpoint
from jaxcls import config as config_lib
from jaxcls import models
from jaxcls import workdir as workdir_lib
from jaxcls.cli import common
from jaxcls.cli import evaluate as evaluate_cli
from jaxcls.cli import export as export_cli
from jaxcls.cli import predict as predict_cli
from jaxcls.cli import report as report_cli

RECIPE = os.path.join(ROOT, "examples", "my_model.py")
MODULE = config_lib.RECIPE_MODULE_PREFIX + "my_model"
TINY = ["--config.num_epochs=1", "--config.data.generated_per_class=24",
        "--config.batch_size=8", "--config.train.progress_bar=false",
        "--config.train.log_images=0"]


def _unregister(monkeypatch):
  """The registry as a new process has it: no 'tiny_net', no recipe module."""
  monkeypatch.delitem(models.BACKBONES, "tiny_net", raising=False)
  monkeypatch.delitem(sys.modules, MODULE, raising=False)


def _registered_from() -> str:
  """The file whose import registered 'tiny_net' (as the recipe's module)."""
  assert "tiny_net" in models.BACKBONES
  assert models.BACKBONES["tiny_net"].__module__ == MODULE
  return sys.modules[MODULE].__file__


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """examples/my_model.py trained for one epoch, as `run_train.py --config` does."""
  from jaxcls import train
  workdir = str(tmp_path_factory.mktemp("my_model"))
  _, overrides = common.split_overrides(TINY)
  config = common.load_config(os.path.relpath(RECIPE), overrides)
  _, summary = train.train_and_evaluate(config, workdir)
  assert summary.stop_reason == "finished"
  return workdir


@pytest.fixture
def unregistered(monkeypatch):
  _unregister(monkeypatch)
  yield
  assert _registered_from() == RECIPE  # The program's load imported the recipe.


def _images(workdir):
  return os.path.join(workdir, "generated_shapes")


@pytest.mark.slow
def test_the_run_records_the_recipe_that_registered_its_backbone(trained):
  mngr = checkpoint.manager(trained, read_only=True)
  try:
    meta = workdir_lib.read_meta(mngr)
  finally:
    mngr.close()
  assert meta.config["model"]["name"] == "tiny_net"
  assert meta.backbone_origin == {"module": MODULE, "file": RECIPE}


@pytest.mark.slow
def test_predict_loads_it(trained, unregistered, capsys):
  image = os.path.join(_images(trained), "disc", "disc_0000.jpg")
  assert predict_cli.main(["--workdir", trained, "--json", image]) == 0
  row = json.loads(capsys.readouterr().out.splitlines()[0])
  assert row["label"] in ("disc", "stripes") and row["path"] == image


@pytest.mark.slow
def test_evaluate_loads_it(trained, unregistered, capsys):
  assert evaluate_cli.main(["--workdir", trained, "--data", f"folder:{_images(trained)}",
                            "--json", "--no-progress"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["count"] == 48 and result["class_names"] == ["disc", "stripes"]


@pytest.mark.slow
def test_export_loads_it(trained, unregistered, tmp_path):
  out = str(tmp_path / "tiny_net.jaxexport")
  assert export_cli.main(["--workdir", trained, "--out", out]) == 0
  assert os.path.getsize(out) > 0


@pytest.mark.slow
def test_report_loads_it(trained, unregistered, tmp_path):
  out = str(tmp_path / "report")
  assert report_cli.main(["--workdir", trained, "--out", out, "--no-progress"]) == 0
  with open(os.path.join(out, "report.json")) as f:
    assert json.load(f)["class_names"] == ["disc", "stripes"]


@pytest.mark.slow
def test_the_server_loads_it_and_answers(trained, unregistered):
  from jaxcls.serve import Predictor
  from jaxcls.serve import server
  predictor = Predictor.from_workdir(trained)  # What jaxcls-serve loads.
  app = server.create_app(predictor, batch_sizes=(1,), decode_workers=1)
  with open(os.path.join(_images(trained), "stripes", "stripes_0000.jpg"), "rb") as f:
    body = f.read()
  with TestClient(app) as client:
    answer = client.post("/predict", content=body, headers={"Content-Type": "image/jpeg"})
  assert answer.status_code == 200, answer.text
  assert answer.json()["label"] in ("disc", "stripes")


@pytest.fixture
def moved_recipe_run(tmp_path, monkeypatch):
  """A run of a copy of the recipe (random weights, no training), whose copy then moves:
  (workdir, the recorded file, where it is now)."""
  from jaxcls.benchmark.predict import write_random_workdir
  _unregister(monkeypatch)
  recorded = str(tmp_path / "recipes" / "my_model.py")
  os.makedirs(os.path.dirname(recorded))
  shutil.copy(RECIPE, recorded)
  config = common.load_config(recorded)
  workdir = str(tmp_path / "run")
  write_random_workdir(workdir, config, ("disc", "stripes"), step=3)
  moved = str(tmp_path / "elsewhere" / "my_model.py")
  os.makedirs(os.path.dirname(moved))
  shutil.move(recorded, moved)
  _unregister(monkeypatch)
  return workdir, recorded, moved


def test_a_moved_recipe_is_one_error_naming_it_and_the_fix(moved_recipe_run, capsys):
  workdir, recorded, _ = moved_recipe_run
  with pytest.raises(models.UnknownModelError) as caught:
    workdir_lib.load_run(workdir)
  assert str(caught.value) == (
      f"model.name 'tiny_net' is registered by {recorded}, which the run in '{workdir}' "
      "recorded, and that file is no longer there; set JAXCLS_MODEL_FILE to the file "
      "that registers it where it is now (e.g. JAXCLS_MODEL_FILE=path/to/my_model.py), "
      "or import that file before loading the run.")
  assert predict_cli.main(["--workdir", workdir, RECIPE]) == 2
  assert capsys.readouterr().err == f"error: {caught.value}\n"


def test_jaxcls_model_file_points_at_the_moved_recipe(moved_recipe_run, monkeypatch):
  workdir, _, moved = moved_recipe_run
  monkeypatch.setenv("JAXCLS_MODEL_FILE", moved)
  run = workdir_lib.load_run(workdir)
  assert _registered_from() == moved
  logits = run.model.apply(run.variables, np.zeros((1, 16, 16, 3), np.uint8))
  assert logits.shape == (1, 2)


def test_importing_the_recorded_module_again_fails_with_one_line(tmp_path, monkeypatch):
  """A recipe that no longer imports (a dependency gone) is named with the reason."""
  broken = tmp_path / "broken.py"
  broken.write_text("import jaxcls_no_such_package\n")
  monkeypatch.setenv("JAXCLS_MODEL_FILE", str(broken))
  monkeypatch.delitem(models.BACKBONES, "tiny_net", raising=False)
  with pytest.raises(models.UnknownModelError) as caught:
    workdir_lib.register_backbone("tiny_net", None, str(tmp_path))
  assert str(caught.value) == (
      f"Importing {broken}, which registers model.name 'tiny_net', failed: "
      "ModuleNotFoundError: No module named 'jaxcls_no_such_package'")


def test_a_built_in_backbone_records_nothing():
  assert workdir_lib.backbone_origin("cnn") is None
  assert workdir_lib.backbone_origin("resnet18") is None
