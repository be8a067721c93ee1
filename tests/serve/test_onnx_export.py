"""ONNX export: ONNX Runtime gives the Predictor's probabilities and labels, for every
built-in model and a new model family, and the example program needs no jax.

Two checks compare ONNX Runtime with the Predictor (MLAS's convolutions against
oneDNN's, both float32):
- norm-wise, the float32 bound of tests/numerics.py for the model's depth and its
  longest sum (the argued one: softmax adds a layer, its sum has C terms);
- max abs over probabilities ≤ 1e-5, the issue's figure. It is checked as well, not
  derived: the worst-case bound above grows with depth and for ResNet-50 allows 1e-3.
  What keeps the real difference far below it is that rounding errors of random sign
  add like a random walk, not linearly, and that batch norm in inference is an affine
  map that does not amplify relative errors; the softmax then halves the logits'
  absolute error (its Jacobian's ∞-norm is 2·p(1-p) ≤ 1/2).
Logits are scaled to a spread of about 3 (`_moderate_logits`) so that probabilities
are not saturated at 0 and 1, where any two computations would agree.
"""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from PIL import Image

import jaxcls.models
from jaxcls.benchmark.predict import write_random_workdir
from jaxcls.cli import export as export_cli
from jaxcls.data import preprocess
from jaxcls.serve import jaxpr_to_onnx, onnx_export
from jaxcls.serve import predictor as predict_lib

from blocked_imports import JAXCLS_AND_FRIENDS, run_blocked
from conftest import ROOT, tiny_config
from numerics import agreement, assert_normwise_close

PROGRAM = os.path.join(ROOT, "examples", "predict_onnx.py")
ISSUE_MAX_ABS = 1e-5  # Issue 19: probabilities equal the Predictor's to 1e-5.
# The tiny CNN's inference and a softmax over 2 classes.
TINY_ONNX = agreement(5 + 1, 3 * 3 * 16)


@pytest.fixture(scope="module")
def predictor(predict_workdir):
  return predict_lib.Predictor.from_workdir(predict_workdir, batch_size=8)


@pytest.fixture(scope="module")
def onnx_file(predict_workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
  assert export_cli.main(["--workdir", predict_workdir, "--format", "onnx",
                          "--out", out]) == 0
  return out


def _assert_matches(probs, labels, expected, expected_labels, bound):
  assert_normwise_close(probs, expected, bound, "ONNX Runtime against the Predictor")
  assert np.abs(probs - expected).max() <= ISSUE_MAX_ABS
  top2 = np.sort(expected, axis=-1)[:, -2:]
  assert np.all(top2[:, 1] - top2[:, 0] > 2 * ISSUE_MAX_ABS)  # No image is a near tie.
  np.testing.assert_array_equal(labels, expected_labels)


def test_cli_writes_the_signature_and_metadata(onnx_file, predictor, capsys):
  model = onnx.load_model(onnx_file)
  (image,), (probs, labels) = model.graph.input, model.graph.output
  shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
  assert (image.name, image.type.tensor_type.elem_type) == (
      "images", onnx.TensorProto.UINT8)
  assert shape(image) == ["N", 16, 16, 3]
  assert (probs.name, probs.type.tensor_type.elem_type) == (
      "probabilities", onnx.TensorProto.FLOAT)
  assert (labels.name, labels.type.tensor_type.elem_type) == (
      "labels", onnx.TensorProto.INT32)
  assert shape(probs) == ["N", 2] and shape(labels) == ["N"]
  _, meta = onnx_export.load(onnx_file)
  assert meta["format"] == "jaxcls-onnx" and meta["format_version"] == 1
  assert meta["class_names"] == ["disc", "stripes"] and meta["image_size"] == 16
  assert meta["input"]["shape"] == ["N", 16, 16, 3]
  assert meta["preprocessing"]["input_mean"] == [127.5] * 3
  assert meta["preprocessing"]["resize"].startswith("PIL.ImageOps.fit")
  assert meta["source"]["step"] == predictor.step == 6 and meta["tta"] is False
  # Only ONNX's own operators: nothing of jaxcls.cpu (a custom call) can be in the file.
  assert {n.domain for n in model.graph.node} == {""}


def test_any_batch_size_matches_the_predictor(onnx_file, predictor):
  session = onnx_export.session(onnx.load_model(onnx_file))
  rng = np.random.default_rng(1)
  for n in (1, 5, 11):
    images = rng.integers(0, 256, (n, 16, 16, 3), np.uint8)
    probs, labels = onnx_export.run(session, images)
    assert probs.shape == (n, 2) and labels.shape == (n,) and labels.dtype == np.int32
    _assert_matches(probs, labels, *predictor.predict_arrays(images), TINY_ONNX)
  with pytest.raises(Exception, match="16"):  # The wrong image size is refused.
    onnx_export.run(session, np.zeros((1, 32, 32, 3), np.uint8))


def test_tta_export_matches_the_tta_predictor(predictor):
  session = onnx_export.session(onnx_export.export_predictor(predictor, tta=True))
  images = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), np.uint8)
  probs, labels = onnx_export.run(session, images)
  _assert_matches(probs, labels, *predictor.predict_arrays(images, tta=True), TINY_ONNX)
  plain, _ = predictor.predict_arrays(images, tta=False)
  assert np.abs(plain - probs).max() > 1e-4  # The mirror average is really in the file.


def _varied_images(folder) -> list[str]:
  """Files in every mode jaxcls reads, EXIF-rotated, and one large JPEG."""
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (30, 20, 3), np.uint8)
  rgb[:10, :10] = (250, 20, 20)  # Asymmetric: a rotation changes the pixels.
  alpha = np.where(np.arange(20) < 10, 255, 0).astype(np.uint8)[None].repeat(30, 0)
  large = np.clip(rng.normal(128, 60, (1500, 2000, 3)), 0, 255).astype(np.uint8)
  palette_alpha = Image.fromarray(rgb).quantize(8)
  palette_alpha.info["transparency"] = 0
  files = {"rgb.png": Image.fromarray(rgb), "gray.png": Image.fromarray(rgb[..., 1], "L"),
           "rgba.png": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
           "la.png": Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"),
           "palette.gif": Image.fromarray(rgb).quantize(8),
           "palette_alpha.png": palette_alpha,
           "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
           "16bit.png": Image.fromarray(rgb[..., 2].astype(np.uint16) * 257),
           "32bit.tif": Image.fromarray(rgb[..., 0].astype(np.int32) * 100, "I"),
           "bilevel.png": Image.fromarray(rgb[..., 0] > 128),
           "large.jpg": Image.fromarray(large)}
  paths = []
  for name, img in files.items():
    paths.append(os.path.join(folder, name))
    img.save(paths[-1])
  for orientation in (3, 6, 8):
    exif = Image.Exif()
    exif[0x0112] = orientation
    paths.append(os.path.join(folder, f"rotated_{orientation}.jpg"))
    Image.fromarray(rgb).save(paths[-1], exif=exif)
  return paths


def _example_preprocess():
  spec = importlib.util.spec_from_file_location(
      "example_preprocess", os.path.join(ROOT, "examples", "_preprocess.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_example_preprocessing_is_jaxcls_byte_for_byte(tmp_path, shapes_dir):
  example = _example_preprocess()
  paths = _varied_images(str(tmp_path)) + [
      os.path.join(shapes_dir, "disc", "disc_0000.jpg"),
      os.path.join(shapes_dir, "stripes", "stripes_0001.png")]
  assert Image.open(paths[-3]).format == "JPEG"  # large.jpg: decoded in draft mode.
  for size in (16, 128, 224):
    for path in paths:
      np.testing.assert_array_equal(example.load(path, size),
                                    preprocess.load_image(path, size), err_msg=path)


def test_example_refuses_what_jaxcls_refuses_as_a_decompression_bomb(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above, as jaxcls.
  path = str(tmp_path / "bomb.png")
  Image.new("L", (40, 30)).save(path)  # 1,200 pixels: over the limit, under twice it.
  with pytest.raises(preprocess.ImageError, match="decompression bomb"):
    preprocess.load_image(path, 16)
  loaded, images, errors = _example_preprocess().load_all([path], 16)
  assert loaded == [] and images.shape == (0, 16, 16, 3)
  assert errors[path].startswith("cannot read: Image size (1200 pixels) exceeds limit")


@pytest.mark.slow
def test_program_without_jax_matches_the_predictor(onnx_file, predictor, shapes_dir,
                                                   tmp_path):
  paths = [os.path.join(shapes_dir, "disc", "disc_0000.jpg"),
           os.path.join(shapes_dir, "stripes", "stripes_0001.png"),
           *_varied_images(str(tmp_path))]
  broken = str(tmp_path / "broken.jpg")
  with open(broken, "wb") as f:
    f.write(b"not an image")
  code, rows, _ = run_blocked(PROGRAM, [onnx_file, *paths, broken],
                              JAXCLS_AND_FRIENDS + ("jax", "jaxlib"), tmp_path)
  assert code == 1  # One input could not be read.
  assert rows[-1]["path"] == broken and rows[-1]["error"].startswith("cannot read")
  rows = rows[:-1]
  assert [r["path"] for r in rows] == paths
  expected = predictor.predict_files(paths)
  probs = np.array([[r["probabilities"][c] for c in predictor.class_names] for r in rows])
  want = np.array([[w.probabilities[c] for c in predictor.class_names] for w in expected])
  names = {c: i for i, c in enumerate(predictor.class_names)}
  _assert_matches(probs, np.array([names[r["label"]] for r in rows]), want,
                  np.array([names[w.label] for w in expected]), TINY_ONNX)


def test_program_refuses_a_file_without_jaxcls_metadata(tmp_path, onnx_file):
  model = onnx.load_model(onnx_file)
  del model.metadata_props[:]
  bare = str(tmp_path / "bare.onnx")
  onnx.save_model(model, bare)
  code, rows, stderr = run_blocked(PROGRAM, [bare, onnx_file], ("jax", "jaxcls"),
                                   tmp_path)
  assert code == 2 and rows == []
  assert stderr.startswith("error: cannot use") and "class_names" in stderr
  with pytest.raises(onnx_export.OnnxFileError, match="not written by jaxcls-export"):
    onnx_export.load(bare)


def test_bad_arguments_exit_2(predict_workdir, tmp_path, capsys):
  out = str(tmp_path / "m.onnx")
  assert export_cli.main(["--workdir", predict_workdir, "--format", "onnx",
                          "--out", out, "--platforms", "cpu"]) == 2
  with pytest.raises(SystemExit) as stop:
    export_cli.main(["--workdir", predict_workdir, "--format", "tflite", "--out", out])
  assert stop.value.code == 2
  (tmp_path / "file").write_text("")
  assert export_cli.main(["--workdir", predict_workdir, "--format", "onnx",
                          "--out", str(tmp_path / "file" / "m.onnx")]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err[0] == ("error: --platforms applies to --format jax only; an ONNX file runs "
                    "wherever ONNX Runtime does.")
  assert err[1].startswith("error: argument --format: invalid choice: 'tflite'")
  assert err[2].startswith(f"error: cannot write '{tmp_path}/file/m.onnx'")
  assert not os.path.exists(out)


def _moderate_logits(predictor, images) -> None:
  """Scales the head so that the logits on `images` spread over about 3: random
  weights otherwise give probabilities of exactly 0 and 1 (see the module docstring)."""
  logits = np.asarray(jax.jit(predictor.model.apply)(predictor.variables, images))
  spread = np.abs(logits - logits.mean(axis=1, keepdims=True)).max()
  head = {k: np.asarray(v) * (3.0 / spread)
          for k, v in predictor.variables["params"]["head"].items()}
  predictor.variables = {**predictor.variables,
                         "params": {**predictor.variables["params"], "head": head}}


def _random_predictor(tmp_path, name, image_size, **overrides):
  config = tiny_config("generated:shapes", **{"model.name": name,
                                              "data.image_size": image_size, **overrides})
  workdir = str(tmp_path / name)
  write_random_workdir(workdir, config, ("cat", "dog", "bird"))
  return predict_lib.Predictor.from_workdir(workdir, batch_size=32)


def _real_images(shapes_dir, tmp_path, size) -> np.ndarray:
  paths = [os.path.join(shapes_dir, kind, f"{kind}_{i:04d}.{ext}")
           for kind, ext in (("disc", "jpg"), ("stripes", "png")) for i in range(6)]
  paths = [p for p in paths if os.path.exists(p)] + _varied_images(str(tmp_path))
  assert len(paths) >= 20
  return np.stack([preprocess.load_image(p, size) for p in paths])


# name, image size, config overrides, depth (layers on the longest path, + the head and
# the softmax), longest sum (a 3×3 convolution over the widest input).
BUILT_IN = [
    pytest.param("cnn", 64, {"model.widths": (32, 64, 128, 256)}, 8 + 2, 3 * 3 * 256,
                 id="cnn-catdog", marks=pytest.mark.slow),
    # 8 convolutions on the longest path; the mirror at test time (a reversal, a
    # concatenation and a mean of two logits) is exported with the model.
    pytest.param("resnet9_s4", 64, {"model.widths": (32, 64, 128, 256),
                                    "model.flip_test": True}, 8 + 2 + 1, 3 * 3 * 256,
                 id="resnet9_s4-catdog", marks=pytest.mark.slow),
    pytest.param("resnet18", 32, {}, 17 + 2, 3 * 3 * 512, id="resnet18",
                 marks=pytest.mark.slow),
    pytest.param("resnet34", 32, {}, 33 + 2, 3 * 3 * 512, id="resnet34",
                 marks=pytest.mark.slow),
    pytest.param("resnet50", 32, {}, 49 + 2, 3 * 3 * 512, id="resnet50",
                 marks=pytest.mark.slow),
    # Stem, 18 blocks of a 7×7 depthwise convolution and two dense layers, 3 downsampling
    # convolutions; the longest sum is the last stage's MLP output (4 × 768).
    pytest.param("convnext_tiny", 32, {}, 1 + 18 * 3 + 3 + 2, 4 * 768, id="convnext_tiny",
                 marks=pytest.mark.slow),
]
# The other ConvNeXt sizes are the tiny one's code with more blocks and channels.
SAME_CODE = {"convnext_small", "convnext_base", "convnext_large",
             "resnet9"}  # resnet9 is resnet9_s4 without the stem's pooling.


@pytest.mark.parametrize("name,size,overrides,depth,longest", BUILT_IN)
def test_every_built_in_model_matches_the_predictor_on_real_images(
    name, size, overrides, depth, longest, shapes_dir, tmp_path):
  # A family added to jaxcls.models fails here until it is added to BUILT_IN.
  assert set(jaxcls.models.BACKBONES) == {p.values[0] for p in BUILT_IN} | SAME_CODE
  predictor = _random_predictor(tmp_path, name, size, **overrides)
  images = _real_images(shapes_dir, tmp_path, size)
  _moderate_logits(predictor, images)
  session = onnx_export.session(onnx_export.export_predictor(predictor))
  probs, labels = onnx_export.run(session, images)
  _assert_matches(probs, labels, *predictor.predict_arrays(images),
                  agreement(depth, longest))


class _NewFamily(nn.Module):
  """Layers no built-in model uses: strided SAME and depthwise convolutions, layer and
  group norm, GELU (tanh and erf forms), sigmoid and swish gates, average pooling, a
  concatenation, a dense layer on a feature map, a flatten."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3), strides=2, padding="SAME")(x)
    x = nn.gelu(nn.LayerNorm()(x))
    x = nn.Conv(16, (3, 3), feature_group_count=16)(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    gate = nn.sigmoid(nn.Dense(16)(x)) * jnp.tanh(x)
    x = nn.swish(nn.GroupNorm(num_groups=4)(jnp.concatenate([x, gate], -1)))
    x = nn.gelu(x, approximate=False)
    return x.reshape((x.shape[0], -1))


def test_a_new_model_family_exports_without_new_code(tmp_path, shapes_dir, monkeypatch):
  monkeypatch.setitem(jaxcls.models.BACKBONES, "newfamily",
                      lambda model_config, dtype, axis_name: _NewFamily())
  predictor = _random_predictor(tmp_path, "newfamily", 16)
  images = _real_images(shapes_dir, tmp_path, 16)
  _moderate_logits(predictor, images)
  session = onnx_export.session(onnx_export.export_predictor(predictor))
  probs, labels = onnx_export.run(session, images)
  # 9 layers on the longest path with the head and softmax; the longest sum is the
  # dense head over the flattened 4×4×32 map.
  _assert_matches(probs, labels, *predictor.predict_arrays(images),
                  agreement(9, 4 * 4 * 32))


class _Cumulative(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return jnp.cumsum(x.reshape((x.shape[0], -1)), axis=1)


def test_an_unsupported_operation_is_named(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(jaxcls.models.BACKBONES, "cumulative",
                      lambda model_config, dtype, axis_name: _Cumulative())
  predictor = _random_predictor(tmp_path, "cumulative", 8)
  with pytest.raises(jaxpr_to_onnx.UnsupportedPrimitiveError, match="'cumsum'"):
    onnx_export.export_predictor(predictor)
  out = str(tmp_path / "m.onnx")
  assert export_cli.main(["--workdir", str(tmp_path / "cumulative"), "--format", "onnx",
                          "--out", out]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: the model uses the JAX operation 'cumsum', which the "
                        "ONNX export cannot write yet; supported: ")
  assert err.count("\n") == 1 and not os.path.exists(out)


def test_a_bfloat16_model_is_refused_with_the_way_out(tmp_path, capsys):
  _random_predictor(tmp_path, "cnn", 8, **{"model.dtype": "bfloat16"})
  assert export_cli.main(["--workdir", str(tmp_path / "cnn"), "--format", "onnx",
                          "--out", str(tmp_path / "m.onnx")]) == 2
  assert capsys.readouterr().err == (
      "error: the model computes in bfloat16, and ONNX's Conv has no bfloat16 version; "
      "export it with --format jax, or export a model trained with "
      "model.dtype=float32.\n")


def test_a_graph_onnx_runtime_cannot_run_is_an_error_not_a_crash():
  double = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [2])
  erf = onnx.helper.make_node("Erf", ["x"], ["y"])
  graph = onnx.helper.make_graph([erf], "g", [double],
                                 [onnx.helper.make_tensor_value_info(
                                     "y", onnx.TensorProto.DOUBLE, [2])])
  model = onnx.helper.make_model(graph, ir_version=jaxpr_to_onnx.IR_VERSION,
                                 opset_imports=[onnx.helper.make_opsetid("", 21)])
  # Valid ONNX, but ONNX Runtime's CPU Erf takes float32 only.
  with pytest.raises(jaxpr_to_onnx.OnnxExportError,
                     match=r"cannot run the model: .*NOT_IMPLEMENTED.*Erf"):
    onnx_export.session(model)
