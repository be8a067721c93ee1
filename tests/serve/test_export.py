"""jaxcls.serve.export: a file that runs with jax and numpy alone and matches the Predictor."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxcls.cli import export as export_cli
from jaxcls.serve import export as export_lib
from jaxcls.serve import predictor as predict_lib

from conftest import ROOT as REPO  # noqa: E402
from blocked_imports import JAXCLS_AND_FRIENDS, run_blocked
from numerics import TINY_CNN_FORWARD, assert_normwise_close
PROGRAM = os.path.join(REPO, "examples", "predict_exported.py")


@pytest.fixture(scope="module")
def predictor(predict_workdir):
  return predict_lib.Predictor.from_workdir(predict_workdir, batch_size=8)


@pytest.fixture(scope="module")
def exported_file(predict_workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "model.jaxexport")
  assert export_cli.main(["--workdir", predict_workdir, "--out", out]) == 0
  return out


def test_metadata_describes_classes_input_and_preprocessing(exported_file, predictor):
  with open(exported_file + ".json") as f:
    meta = json.load(f)
  assert meta["class_names"] == ["disc", "stripes"]
  assert meta["image_size"] == predictor.image_size == 16
  assert meta["input"]["shape"] == ["N", 16, 16, 3] and meta["input"]["dtype"] == "uint8"
  assert meta["platforms"] == ["cpu", "cuda"]
  assert meta["preprocessing"]["input_mean"] == [127.5] * 3
  assert meta["source"]["step"] == predictor.step == 6 and meta["tta"] is False


def test_batch_size_is_symbolic_and_results_match(exported_file, predictor):
  exported, _ = export_lib.load(exported_file)
  assert jax.export.is_symbolic_dim(exported.in_avals[0].shape[0])
  assert exported.in_avals[0].dtype == np.uint8
  rng = np.random.default_rng(1)
  for n in (1, 5, 11):
    images = rng.integers(0, 256, (n, 16, 16, 3), np.uint8)
    expected, _ = predictor.predict_arrays(images)
    # The file holds XLA's convolutions; the Predictor runs jaxcls.cpu's (oneDNN).
    assert_normwise_close(np.asarray(exported.call(images)), expected, TINY_CNN_FORWARD)
  with pytest.raises(Exception, match="16"):  # The wrong image size is refused.
    exported.call(np.zeros((1, 32, 32, 3), np.uint8))


def test_tta_export_matches_tta_predictor(predictor):
  exported = export_lib.export_predictor(predictor, tta=True, platforms=("cpu",))
  images = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), np.uint8)
  expected, _ = predictor.predict_arrays(images, tta=True)
  assert_normwise_close(np.asarray(exported.call(images)), expected, TINY_CNN_FORWARD)
  plain, _ = predictor.predict_arrays(images, tta=False)
  assert np.abs(plain - expected).max() > 1e-4


@pytest.mark.slow
def test_program_without_jaxcls_flax_or_optax_matches_predictor(
    exported_file, predictor, shapes_dir, tmp_path):
  rgb = np.random.default_rng(3).integers(0, 256, (30, 20, 3), np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 8
  rgba = np.dstack([rgb, np.where(np.arange(20) < 10, 255, 0).astype(np.uint8)[None]
                    .repeat(30, 0)])
  extra = {"gray.png": Image.fromarray(rgb[..., 1], "L"),
           "rgba.png": Image.fromarray(rgba, "RGBA"),
           "palette.gif": Image.fromarray(rgb).quantize(8),
           "16bit.png": Image.fromarray(rgb[..., 2].astype(np.uint16) * 257),
           "rotated.jpg": Image.fromarray(rgb)}
  paths = [os.path.join(shapes_dir, "disc", "disc_0000.jpg"),
           os.path.join(shapes_dir, "stripes", "stripes_0001.png")]
  for name, img in extra.items():
    path = str(tmp_path / name)
    img.save(path, **({"exif": exif} if name == "rotated.jpg" else {}))
    paths.append(path)
  code, rows, stderr = run_blocked(PROGRAM, [exported_file, *paths], JAXCLS_AND_FRIENDS,
                                   tmp_path)
  assert code == 0, stderr
  expected = predictor.predict_files(paths)
  assert [r["path"] for r in rows] == paths
  for row, want in zip(rows, expected):
    assert row["label"] == want.label, row["path"]
    for name in predictor.class_names:
      assert abs(row["probabilities"][name] - want.probabilities[name]) <= TINY_CNN_FORWARD


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["missing", "not a jax.export file"])
def test_program_refuses_a_model_it_cannot_use(exported_file, tmp_path, problem):
  model = str(tmp_path / "model.jaxexport")
  if problem != "missing":
    with open(model, "wb") as f:
      f.write(b"\x00" * 64)  # Fails as an ONNX file given by mistake does.
    with open(exported_file + ".json") as src, open(model + ".json", "w") as dst:
      dst.write(src.read())
  code, rows, stderr = run_blocked(PROGRAM, [model, os.path.join(REPO, "README.md")],
                                   JAXCLS_AND_FRIENDS, tmp_path)
  assert code == 2 and rows == []
  assert stderr.startswith(f"error: cannot use {model}: ") and "Traceback" not in stderr
  assert len(stderr.strip().splitlines()) == 1, stderr


def test_bad_arguments_exit_2(predict_workdir, tmp_path, capsys):
  out = str(tmp_path / "m.jaxexport")
  assert export_cli.main(["--workdir", predict_workdir, "--out", out,
                          "--platforms", "cpu,gpu"]) == 2
  assert export_cli.main(["--workdir", str(tmp_path / "none"), "--out", out]) == 2
  err = capsys.readouterr().err
  assert "unknown ['gpu']" in err and "No checkpoints" in err
  assert not os.path.exists(out)


def test_the_command_line_default_platforms_are_the_librarys():
  assert export_cli.DEFAULT_PLATFORMS == export_lib.DEFAULT_PLATFORMS
  assert export_cli.build_parser().format_help().count("cpu,cuda") == 1
