"""Importing torchvision-layout ResNet weights: the converted model's logits match PyTorch's.

The reference ResNet is written here in PyTorch with torchvision's module names, so the
test needs torch (CPU build) but not torchvision; without torch those tests skip.
"""

import json
import os
import struct

import numpy as np
import pytest

from jaxcls import pretrained
from jaxcls.cli import pretrained as pretrained_cli
from jaxcls.serve import Predictor

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.


def torch_resnet(arch: str, num_classes: int, seed: int = 0):
  """A torchvision-layout ResNet in eval mode, with non-trivial batch-norm statistics."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class Basic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or inplanes != planes:
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.downsample = None
      if stride != 1 or inplanes != planes * 4:
        self.downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = torch.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self, block, layers):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      inplanes = 64
      for stage, blocks in enumerate(layers):
        planes = 64 * 2 ** stage
        modules = []
        for i in range(blocks):
          modules.append(block(inplanes, planes, 2 if stage > 0 and i == 0 else 1))
          inplanes = planes * block.expansion
        setattr(self, f"layer{stage + 1}", nn.Sequential(*modules))
      self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      for stage in range(1, 5):
        x = getattr(self, f"layer{stage}")(x)
      return self.fc(torch.flatten(x.mean((2, 3)), 1))

  torch.manual_seed(seed)
  block, layers = {"resnet18": (Basic, (2, 2, 2, 2)),
                   "resnet50": (Bottleneck, (3, 4, 6, 3))}[arch]
  model = ResNet(block, layers)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):  # As after training: not 0/1.
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
    model.fc.weight.mul_(10.0)  # Logits of order 1 rather than 0.1.
  return model.eval()


def torch_logits(model, images: np.ndarray) -> np.ndarray:
  import torch
  mean = np.asarray(pretrained.IMAGENET_MEAN, np.float32)
  std = np.asarray(pretrained.IMAGENET_STD, np.float32)
  x = torch.from_numpy(((images.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2))
  with torch.no_grad():
    return model(x).numpy()


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
