"""PyTorch eager reference for the jaxcls train step: ResNet-18, CPU, channels-last.

    jaxcls-benchmark torch-resnet18 [--steps 10] [--warmup 2] [--image-size 128] \
        [--batch-size 32] [--threads N]

The same model and step as `jaxcls-benchmark step --config configs/catdog.py
--config.model.name=resnet18 --config.batch_size=32`: torchvision's ResNet-18 layout
(written out here, torchvision is not needed), dropout 0.4 before a 2-class linear head,
SGD with momentum 0.9 and weight decay 5e-4, float32, synthetic batches already in
memory, normalization inside the step, no augmentation. Prints one JSON object with the
median step time and images/sec. Not a dependency of jaxcls.
"""

from __future__ import annotations

import json
import statistics
import time

import torch  # This benchmark only: `jaxcls-benchmark torch-resnet18`.
from torch import nn

from jaxcls.cli import common


class BasicBlock(nn.Module):
  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + identity)


class ResNet18(nn.Module):
  """torchvision.models.resnet18's layers, with dropout before the classifier."""

  def __init__(self, num_classes: int = 2, dropout: float = 0.4):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    layers, inplanes = [], 64
    for stage, planes in enumerate((64, 128, 256, 512)):
      stride = 1 if stage == 0 else 2
      layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride),
                                  BasicBlock(planes, planes, 1)))
      inplanes = planes
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.dropout = nn.Dropout(dropout)
    self.fc = nn.Linear(512, num_classes)

  def forward(self, images):
    x = (images - 127.5) / 127.5  # jaxcls normalizes inside the model too.
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def measure(steps: int = 10, warmup: int = 2, image_size: int = 128,
            batch_size: int = 32, threads: int | None = None) -> dict:
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = ResNet18().to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                              weight_decay=5e-4)
  loss_fn = nn.CrossEntropyLoss()
  images = torch.randint(0, 256, (batch_size, 3, image_size, image_size)).float()
  images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, 2, (batch_size,))
  times, cpu_times = [], []
  for i in range(warmup + steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()
    loss_value = loss.item()  # Synchronizes, as jaxcls's timing does.
    if i >= warmup:
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  step_s = statistics.median(times)
  return {"framework": "pytorch-eager", "torch_version": torch.__version__,
          "model": "resnet18", "image_size": image_size, "batch_size": batch_size,
          "threads": torch.get_num_threads(), "steps_timed": steps,
          "step_ms_median": round(step_s * 1e3, 2), "step_ms_min": round(min(times) * 1e3, 2),
          "step_cpu_s_median": round(statistics.median(cpu_times), 3),
          "step_images_per_sec": round(batch_size / step_s, 2),
          "loss_finite": bool(torch.isfinite(torch.tensor(loss_value)))}


def main(argv=None) -> int:
  parser = common.Parser(prog="jaxcls-benchmark torch-resnet18",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--image-size", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--threads", type=int, default=None)
  args = parser.parse_args(argv)
  print(json.dumps(measure(args.steps, args.warmup, args.image_size, args.batch_size,
                           args.threads)))
  return 0
