"""Predictor and the predict CLI: same pixels and probabilities as evaluation, any input."""

import csv
import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from jaxcls import parallel, steps
from jaxcls.cli import predict as predict_cli
from jaxcls.data import loader, sources
from jaxcls.models import create_model
from jaxcls.serve import predictor as predict_lib
from numerics import TINY_CNN_FORWARD, assert_normwise_close

from conftest import ROOT as REPO  # noqa: E402


@pytest.fixture(scope="module")
def predictor(predict_workdir):
  p = predict_lib.Predictor.from_workdir(predict_workdir, batch_size=16)
  p.workers = 2
  return p


def _probs(results):
  assert all(r.ok for r in results), [r.error for r in results if not r.ok]
  return np.array([[r.probabilities[c] for c in sorted(r.probabilities)] for r in results])


def _pattern(height=40, width=24, seed=0):
  """An asymmetric RGB image, so that rotations and mirrors change what the model sees."""
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (height, width, 3), np.uint8)
  img[: height // 3, : width // 2] = (250, 20, 20)
  return img


@pytest.mark.slow
def test_predictor_matches_the_evaluation_path(predictor, shapes_dir, make_config):
  """Every validation file: the loader's eval pixels are the Predictor's, byte for byte,
  and `steps.eval_step` (pmapped over 8 devices) sees the Predictor's probabilities."""
  config = make_config(f"folder:{shapes_dir}")
  val = sources.build_dataset(config.data, config.seed, workers=2).val
  batches = list(loader.eval_batches(val, batch_size=config.batch_size,
                                     image_size=config.data.image_size))
  eval_images = np.concatenate([b["image"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  paths = [os.path.join(val.root, p) for p in val.paths]
  assert len(paths) == len(eval_images) >= 16

  # 1. The same pixels.
  predict_images = np.stack([predictor._load(p) for p in paths])
  np.testing.assert_array_equal(predict_images, eval_images)

  # 2. The same probabilities: eval_step's per-example loss is -log p[label].
  model = create_model(config.model, 2, axis_name=parallel.AXIS)
  state = steps.TrainState.create(apply_fn=steps.apply_model(model), tx=optax.identity(),
                                  params=predictor.variables["params"],
                                  batch_stats=predictor.variables["batch_stats"])
  devices = jax.local_devices()
  p_eval = jax.pmap(steps.eval_step, axis_name=parallel.AXIS)
  replicated = parallel.replicate(state, devices)
  eval_p_label, eval_correct = [], []
  for batch in batches:
    for r in np.flatnonzero(batch["mask"]):
      one = dict(batch, mask=np.arange(len(batch["mask"])) == r)
      sums = jax.device_get(p_eval(replicated, parallel.shard(one, len(devices))))
      assert int(sums["count"][0]) == 1
      eval_p_label.append(np.exp(-float(sums["loss"][0])))
      eval_correct.append(int(sums["correct"][0]))
  results = predictor.predict_files(paths)
  probs = _probs(results)  # Columns in sorted class order: disc, stripes.
  p_label = probs[np.arange(len(labels)), labels]
  # Other batch sizes than the Predictor's: the kernels may sum in other orders.
  assert_normwise_close(np.asarray(eval_p_label), p_label, TINY_CNN_FORWARD)
  predicted = np.array([predictor.class_names.index(r.label) for r in results])
  np.testing.assert_array_equal(eval_correct, (predicted == labels).astype(int))
  # A wrong path (no batch-norm running averages: train mode) would not match.
  train_mode = jax.nn.softmax(predictor.model.apply(
      predictor.variables, eval_images[:8], train=True, mutable=["batch_stats"])[0])
  assert np.abs(np.asarray(train_mode) - probs[:8]).max() > 1e-3


def _save(img, path, **kwargs):
  img.save(path, **kwargs)
  return str(path)


@pytest.mark.parametrize("mode", ["grayscale", "palette", "rgba", "cmyk", "16-bit", "exif"])
def test_any_mode_is_predicted_as_upright_rgb(predictor, tmp_path, mode):
  rgb = _pattern()
  gray = rgb[..., 0]
  if mode == "grayscale":
    path = _save(Image.fromarray(gray, "L"), tmp_path / "g.png")
    reference = np.dstack([gray] * 3)
  elif mode == "palette":
    img = Image.fromarray(rgb).quantize(16)
    path, reference = _save(img, tmp_path / "p.png"), np.asarray(img.convert("RGB"))
  elif mode == "rgba":
    alpha = np.full(gray.shape, 255, np.uint8)
    alpha[:, 12:] = 0  # Right half transparent: white, as training saw it.
    path = _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), tmp_path / "a.png")
    reference = rgb.copy()
    reference[:, 12:] = 255
  elif mode == "cmyk":
    img = Image.fromarray(rgb).convert("CMYK")
    path, reference = _save(img, tmp_path / "c.tif"), np.asarray(img.convert("RGB"))
  elif mode == "16-bit":
    img = Image.fromarray(gray.astype(np.uint16) * 257)
    assert img.mode.startswith("I;16")
    path, reference = _save(img, tmp_path / "16.png"), np.dstack([gray] * 3)
  else:  # Stored rotated; the EXIF orientation tag (6) says how to turn it upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)
    path, reference = _save(stored, tmp_path / "e.png", exif=exif), rgb
  np.testing.assert_array_equal(predictor._load(path), predictor._load(reference))
  from_file = _probs(predictor.predict_files([path]))
  np.testing.assert_array_equal(from_file, _probs(predictor.predict_images([reference])))
  if mode == "exif":  # Ignoring the tag would have given other probabilities.
    sideways = _probs(predictor.predict_images([np.asarray(stored)]))
    assert np.abs(sideways - from_file).max() > 1e-4


def _png_header_only(path, width, height):
  """A 60-byte PNG that claims width x height pixels: a decompression bomb's header."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
  return str(path)


def _tiff_unknown_mode(path):
  """A TIFF Pillow recognises but has no mode for: 5 samples of 8 bits per pixel."""
  spp, width, height = 5, 2, 2
  data_offset = 8 + 2 + 9 * 12 + 4 + 2 * spp
  tags = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, spp, 8 + 2 + 9 * 12 + 4),
          (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, data_offset), (277, 3, 1, spp),
          (279, 4, 1, width * height * spp), (284, 3, 1, 1)]
  blob = b"II*\x00" + struct.pack("<IH", 8, len(tags))
  blob += b"".join(struct.pack("<HHII", *tag) for tag in tags) + struct.pack("<I", 0)
  blob += struct.pack("<" + "H" * spp, *[8] * spp) + bytes(width * height * spp)
  with open(path, "wb") as f:
    f.write(blob)
  return str(path)


def test_unreadable_inputs_become_error_lines_in_order(predictor, tmp_path, shapes_dir):
  good = os.path.join(shapes_dir, "disc", "disc_0000.jpg")
  jpeg = io.BytesIO()
  Image.fromarray(_pattern(64, 64)).save(jpeg, "JPEG")
  (tmp_path / "empty.jpg").write_bytes(b"")
  (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
  (tmp_path / "text.jpg").write_text("not an image at all")
  (tmp_path / "tiny.jpg").write_bytes(b"vm\n")  # Some format checks fail on 3 bytes.
  inputs = {
      "empty": str(tmp_path / "empty.jpg"),
      "truncated": str(tmp_path / "truncated.jpg"),
      "good": good,
      "text": str(tmp_path / "text.jpg"),
      "tiny": str(tmp_path / "tiny.jpg"),
      "bomb": _png_header_only(tmp_path / "bomb.png", 20_000, 20_000),
      "mode": _tiff_unknown_mode(tmp_path / "mode.tif"),
      "missing": str(tmp_path / "missing.jpg"),
  }
  results = predictor.predict_files(list(inputs.values()))
  assert [r.path for r in results] == list(inputs.values())
  by_name = dict(zip(inputs, results))
  assert by_name["good"].ok and by_name["good"].label in ("disc", "stripes")
  expected = {"empty": "empty file", "truncated": "truncated", "text": "not an image",
              "tiny": "not an image file Pillow can identify",
              "bomb": "decompression bomb", "mode": "TIFF file Pillow cannot open",
              "missing": "no such file"}
  for name, words in expected.items():
    assert not by_name[name].ok, name
    assert words in by_name[name].error, (name, by_name[name].error)


def test_image_errors_say_what_kind_of_problem_they_are(tmp_path):
  """The server answers 415 for what is not an image and 413 for too many pixels."""
  from jaxcls.data import preprocess
  with pytest.raises(preprocess.NotAnImageError):
    preprocess.load_image(b"vm\n", 16)
  with pytest.raises(preprocess.TooManyPixelsError):
    preprocess.load_image(_png_header_only(tmp_path / "bomb.png", 20_000, 20_000), 16)
  with pytest.raises(preprocess.ImageError) as empty:
    preprocess.load_image(b"", 16)
  assert type(empty.value) is preprocess.ImageError


def test_batches_and_threads_give_the_per_image_answers(predictor, shapes_dir):
  paths = predict_cli.expand_paths([shapes_dir])[:37]
  batched = predictor.predict_files(paths, top_k=2)
  single = predict_lib.Predictor(predictor.model, predictor.variables,
                                 predictor.class_names, predictor.image_size,
                                 batch_size=1, workers=1)
  one_by_one = [single.predict_files([p])[0] for p in paths]
  assert_normwise_close(_probs(batched), _probs(one_by_one), TINY_CNN_FORWARD)
  for r in batched:
    assert r.top_k[0] == (r.label, r.probability)
    assert r.top_k[0][1] >= r.top_k[1][1]
    assert sum(p for _, p in r.top_k) == pytest.approx(1.0, abs=1e-5)


def test_tta_averages_the_image_and_its_mirror(predictor):
  image = _pattern(16, 16)
  mirror = image[:, ::-1]
  plain = _probs(predictor.predict_images([image, mirror]))
  predictor.tta = True
  try:
    tta = _probs(predictor.predict_images([image, mirror]))
  finally:
    predictor.tta = False
  assert_normwise_close(tta[0], plain.mean(axis=0), TINY_CNN_FORWARD)
  assert_normwise_close(tta[0], tta[1], TINY_CNN_FORWARD)
  assert np.abs(plain[0] - plain[1]).max() > 1e-4  # The mirror alone differs.


def test_expand_inputs_handles_folders_globs_and_misses(shapes_dir, tmp_path):
  (tmp_path / "empty_folder").mkdir()
  entries = predict_cli.expand_inputs([
      os.path.join(shapes_dir, "disc", "*_000[0-2].*"), shapes_dir,
      str(tmp_path / "empty_folder"), str(tmp_path / "*.nothing"), "plain.jpg"])
  paths = [p for p, e in entries if e is None]
  assert paths[:3] == [os.path.join(shapes_dir, "disc", f"disc_000{i}.{ext}")
                       for i, ext in ((0, "jpg"), (1, "png"), (2, "jpg"))]
  assert len(paths) == 3 + 132 + 1 and paths[-1] == "plain.jpg"
  assert paths[3:135] == sorted(paths[3:135])  # The folder, recursively and sorted.
  errors = [(p, e) for p, e in entries if e is not None]
  assert [p for p, _ in errors] == [str(tmp_path / "empty_folder"),
                                    str(tmp_path / "*.nothing")]
  assert "no image files" in errors[0][1]
  assert errors[1][1] == "no file matches this pattern"


def _cli(capsys, *argv):
  code = predict_cli.main(list(argv) + ["--no-compilation-cache"])
  out, err = capsys.readouterr()
  assert "Traceback" not in out + err
  return code, out, err


@pytest.mark.slow
def test_cli_csv_with_folder_and_errors(predictor, predict_workdir, shapes_dir, tmp_path,
                                        capsys):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 broken")
  out_csv = tmp_path / "out.csv"
  code, out, err = _cli(capsys, "--workdir", predict_workdir, shapes_dir, str(bad),
                        str(tmp_path / "gone.png"), "--top-k", "2", "--batch-size", "16",
                        "--output", str(out_csv))
  assert code == 1 and out == ""
  rows = list(csv.DictReader(out_csv.open()))
  assert len(rows) == 134
  files = predict_cli.expand_paths([shapes_dir])
  assert [r["path"] for r in rows] == files + [str(bad), str(tmp_path / "gone.png")]
  assert "134/134" in err  # The progress bar (more than MANY_FILES inputs).
  assert rows[-1]["error"] == "no such file" and rows[-2]["error"]
  expected = predictor.predict_files(files[:20], top_k=2)
  for row, want in zip(rows, expected):
    assert row["label"] == want.label and row["error"] == ""
    # The CLI's batches are not the API's: float32 rounding apart.
    assert abs(float(row["prob_disc"]) - want.probabilities["disc"]) <= TINY_CNN_FORWARD
    assert row["top2_label"] == want.top_k[1][0]
  counts = {c: sum(r["label"] == c for r in rows) for c in ("disc", "stripes")}
  assert "Predicted 132 of 134 input(s)" in err and "2 failed" in err
  per_class = ", ".join(f"{c} {n}" for c, n in counts.items() if n)  # Zero counts left out.
  assert f"Per class: {per_class}." in err


@pytest.mark.slow
def test_cli_jsonl_text_and_exit_status(predictor, predict_workdir, shapes_dir, tmp_path,
                                        capsys):
  files = predict_cli.expand_paths([os.path.join(shapes_dir, "stripes")])[:3]
  out_jsonl = tmp_path / "out.jsonl"
  code, _, err = _cli(capsys, "--workdir", predict_workdir, *files, "--tta",
                      "--output", str(out_jsonl))
  assert code == 0 and "0 failed" in err
  rows = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
  predictor.tta = True
  try:
    expected = predictor.predict_files(files)
  finally:
    predictor.tta = False
  assert [r["path"] for r in rows] == files
  for row, want in zip(rows, expected):
    assert row["label"] == want.label and len(row["top_k"]) == 1
    assert abs(row["probabilities"]["stripes"] - want.probabilities["stripes"]) <= (
        TINY_CNN_FORWARD)

  code, out, _ = _cli(capsys, "--workdir", predict_workdir, files[0],
                      os.path.join(shapes_dir, "nope*.png"))
  lines = out.splitlines()
  assert code == 1 and len(lines) == 2
  plain = predictor.predict_files(files[:1])[0]
  assert lines[0] == f"{files[0]}\t{plain.label}\t{plain.probability:.4f}"
  assert lines[1].endswith("error: no file matches this pattern")

  assert _cli(capsys, "--workdir", predict_workdir, files[0], "--output", "x.txt")[0] == 2
  code, _, err = _cli(capsys, "--workdir", predict_workdir, files[0],
                      "--output", str(tmp_path / "no_folder" / "out.csv"))
  assert code == 2 and "cannot write --output" in err
  code, _, err = _cli(capsys, "--workdir", str(tmp_path / "nothing"), files[0],
                      "--output", str(tmp_path / "never.jsonl"))
  assert code == 2 and "No checkpoints" in err
  assert not (tmp_path / "never.jsonl").exists()  # No empty file left behind.


@pytest.mark.slow
def test_second_cli_run_uses_the_compilation_cache(predict_workdir, shapes_dir, tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_LOG_COMPILES="1",
             JAXCLS_COMPILATION_CACHE=str(cache), XDG_CACHE_HOME=str(tmp_path / "xdg"))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # conftest's shared test cache.
  image = os.path.join(shapes_dir, "disc", "disc_0001.png")
  command = [sys.executable, "-m", "jaxcls.cli.predict", "--workdir", predict_workdir, image]
  first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                         cwd=REPO)
  assert first.returncode == 0, first.stderr
  assert "cache hit for 'jit_predict'" not in first.stderr
  assert any(name.startswith("jit_predict") for name in os.listdir(cache))
  second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
  assert second.returncode == 0, second.stderr
  assert "Persistent compilation cache hit for 'jit_predict'" in second.stderr
  assert second.stdout == first.stdout and second.stdout.startswith(image + "\t")
  assert not (tmp_path / "xdg").exists()  # The variable, not the default folder.


def test_predict_images_takes_a_sequence_and_refuses_a_single_image(predictor):
  """One [H, W, 3] array is one image, not H of them: passing it bare is an error that
  says how to pass it, never a guess."""
  image = _pattern(50, 24)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  for single, what in [(image, r"array of shape \(50, 24, 3\)"),
                       (Image.fromarray(image), "PIL image"),
                       (buffer.getvalue(), "bytes object")]:
    with pytest.raises(TypeError, match=r"^predict_images takes a sequence of images and "
                                        rf"got one {what}\. Pass \[image\]"):
      predictor.predict_images(single)
  one = predictor.predict_images([image])
  assert len(one) == 1 and one[0].ok
  pair = predictor.predict_images(np.stack([image, image[::-1]]))  # [N, H, W, C]: N images.
  assert [r.probabilities for r in pair] == [
      r.probabilities for r in predictor.predict_images([image, image[::-1]])]


def test_from_workdir_takes_every_option_and_logs_nothing(predict_workdir, caplog):
  with caplog.at_level(logging.WARNING):
    predictor = predict_lib.Predictor.from_workdir(predict_workdir, tta=True, workers=1,
                                                   batch_size=4)
  assert (predictor.tta, predictor.workers, predictor.batch_size) == (True, 1, 4)
  assert [r.getMessage() for r in caplog.records] == []  # Orbax's read-only notices.
  with pytest.raises(TypeError, match="colour"):
    predict_lib.Predictor.from_workdir(predict_workdir, colour="red")


def test_the_api_and_the_cli_default_to_the_same_top_k(predictor, predict_workdir,
                                                      shapes_dir, capsys):
  path = os.path.join(shapes_dir, "disc", "disc_0000.jpg")
  assert predict_lib.DEFAULT_TOP_K == 1
  assert len(predictor.predict_files([path])[0].top_k) == predict_lib.DEFAULT_TOP_K
  assert predict_cli.main(["--workdir", predict_workdir, "--json", path]) == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert len(row["top_k"]) == predict_lib.DEFAULT_TOP_K
