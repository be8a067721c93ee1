"""Importing local ResNet weights files: the converted model's logits match PyTorch's.

The reference ResNet (torch_models.py) is written in PyTorch with torchvision's module
names, so the test needs torch (CPU build) but not torchvision; without torch those
tests skip. Published sources (hf-hub:, torchvision:) are tested in tests/pretrained/.
"""

import json
import os
import struct

import numpy as np
import pytest

from jaxcls import pretrained
from jaxcls.cli import pretrained as pretrained_cli
from jaxcls.serve import Predictor
from torch_models import torch_logits, torch_resnet

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.


def jax_logits(workdir: str, images: np.ndarray) -> np.ndarray:
  predictor = Predictor.from_workdir(workdir)
  return np.asarray(predictor.model.apply(predictor.variables, images, train=False))


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_safetensors(path: str, tensors: dict) -> None:
  """The format: little-endian u64 header length, JSON header, raw little-endian data."""
  header, offset, blobs = {}, 0, []
  for name, array in tensors.items():
    data = np.ascontiguousarray(array, np.float32).tobytes()
    header[name] = {"dtype": "F32", "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    offset += len(data)
    blobs.append(data)
  encoded = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_resnet50_pth_import_matches_pytorch_logits(tmp_path):
  torch = pytest.importorskip("torch")
  model = torch_resnet("resnet50", num_classes=5)
  weights = str(tmp_path / "resnet50.pth")
  torch.save(model.state_dict(), weights)
  classes = tmp_path / "classes.txt"
  classes.write_text("tench\ngoldfish\nshark\n\nhen\nostrich\n")
  out = str(tmp_path / "imported")
  assert pretrained_cli.main(["import", "--arch", "resnet50", "--weights", weights,
                          "--out", out, "--classes", str(classes)]) == 0
  batch = images(2, 64)
  expected, got = torch_logits(model, batch), jax_logits(out, batch)
  assert np.std(expected) > 0.1  # Logits that differ, so 1e-4 is a real bound.
  assert np.max(np.abs(got - expected)) <= 1e-4
  predictor = Predictor.from_workdir(out)
  assert predictor.class_names == ("tench", "goldfish", "shark", "hen", "ostrich")
  assert predictor.image_size == 224


def test_resnet18_safetensors_import_matches_pytorch_logits(tmp_path):
  model = torch_resnet("resnet18", num_classes=7, seed=1)
  weights = str(tmp_path / "resnet18.safetensors")
  write_safetensors(weights, {"module." + k: v.numpy()
                              for k, v in model.state_dict().items()
                              if not k.endswith("num_batches_tracked")})
  out = pretrained.import_weights("resnet18", weights, str(tmp_path / "imported"),
                                  image_size=32)
  batch = images(3, 32, seed=1)
  expected, got = torch_logits(model, batch), jax_logits(out, batch)
  assert np.std(expected) > 0.1
  assert np.max(np.abs(got - expected)) <= 1e-4
  predictor = Predictor.from_workdir(out)
  assert predictor.class_names == tuple(str(i) for i in range(7))
  # The imported workdir predicts on files like any run: a 32 px PNG through load_image.
  from PIL import Image
  path = str(tmp_path / "one.png")
  Image.fromarray(batch[0]).save(path)
  (result,) = predictor.predict_files([path])
  assert result.label == str(int(np.argmax(expected[0])))


def test_safetensors_reader_round_trips_without_torch(tmp_path):
  tensors = {"a.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
             "b": np.array([1.5, -2.0], np.float32)}
  path = str(tmp_path / "t.safetensors")
  write_safetensors(path, tensors)
  read = pretrained.read_safetensors(path)
  assert set(read) == set(tensors)
  for name in tensors:
    np.testing.assert_array_equal(read[name], tensors[name])


def test_weights_for_another_architecture_are_refused_with_the_missing_names(tmp_path):
  tensors = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
             "fc.weight": np.zeros((4, 512), np.float32), "fc.bias": np.zeros((4,))}
  path = str(tmp_path / "partial.safetensors")
  write_safetensors(path, tensors)
  with pytest.raises(pretrained.WeightsError, match=r"99 problems: missing 'bn1\.running_mean'"):
    pretrained.import_weights("resnet18", path, str(tmp_path / "out"))
  assert not os.path.exists(str(tmp_path / "out" / "checkpoints"))


def test_cli_reports_a_missing_file(tmp_path, capsys):
  code = pretrained_cli.main(["import", "--arch", "resnet18", "--weights",
                          str(tmp_path / "nope.pth"), "--out", str(tmp_path / "out")])
  assert code == 2 and "No weights file" in capsys.readouterr().err


def test_a_local_file_needs_arch_and_published_weights_refuse_a_wrong_one(tmp_path, capsys):
  path = str(tmp_path / "w.safetensors")
  write_safetensors(path, {"fc.weight": np.zeros((2, 512), np.float32)})
  code = pretrained_cli.main(["import", "--weights", path, "--out", str(tmp_path / "o")])
  assert code == 2
  assert capsys.readouterr().err == (
      f"error: '{path}' is a local file: say which architecture it holds with --arch (one "
      "of ['convnext_base', 'convnext_large', 'convnext_small', 'convnext_tiny', "
      "'resnet18', 'resnet34', 'resnet50']).\n")
  code = pretrained_cli.main(["import", "--weights", "torchvision:resnet101", "--out",
                              str(tmp_path / "o")])
  assert code == 2 and capsys.readouterr().err.startswith(
      "error: 'torchvision:resnet101' is not a torchvision release jaxcls converts")
