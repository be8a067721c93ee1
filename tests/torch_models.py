"""Reference PyTorch models with torchvision's and timm's module names, in plain torch.nn.

torchvision and timm themselves are not used: torchvision's PyPI build does not load
against the CPU build of torch the tests run with, and timm imports torchvision. The
module and parameter names here are theirs (torchvision's ResNet; timm's ConvNeXt), so a
state dict of these models is what their published files hold. Each model comes in eval
mode with its normalization layers' parameters drawn away from 1 and 0, as after
training.
"""

import numpy as np
import pytest

from jaxcls.pretrained import IMAGENET_MEAN, IMAGENET_STD


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


def _convnext_modules(torch):
  """timm's ConvNeXt (linear-MLP variants: tiny to large), module for module."""
  nn, F = torch.nn, torch.nn.functional

  class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's LayerNorm2d)."""

    def forward(self, x):
      x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight,
                       self.bias, self.eps)
      return x.permute(0, 3, 1, 2)

  class Mlp(nn.Module):
    def __init__(self, dim):
      super().__init__()
      self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
      return self.fc2(self.act(self.fc1(x)))

  class Block(nn.Module):
    def __init__(self, dim):
      super().__init__()
      self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
      self.norm = nn.LayerNorm(dim, eps=1e-6)
      self.mlp = Mlp(dim)
      self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
      y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
      return x + y * self.gamma.reshape(1, -1, 1, 1)

  class Stage(nn.Module):
    def __init__(self, in_dim, dim, depth):
      super().__init__()
      self.downsample = nn.Identity() if in_dim == dim else nn.Sequential(
          LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, 2))
      self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])

    def forward(self, x):
      return self.blocks(self.downsample(x))

  class Head(nn.Module):
    def __init__(self, dim, num_classes):
      super().__init__()
      self.norm, self.fc = LayerNorm2d(dim, eps=1e-6), nn.Linear(dim, num_classes)

    def forward(self, x):
      return self.fc(torch.flatten(self.norm(x.mean((2, 3), keepdim=True)), 1))

  return LayerNorm2d, Stage, Head


def torch_convnext(depths, dims, num_classes: int, seed: int = 0):
  """timm's ConvNeXt in eval mode, layer scales and norms drawn as after training."""
  torch = pytest.importorskip("torch")
  nn = torch.nn
  LayerNorm2d, Stage, Head = _convnext_modules(torch)

  class ConvNeXt(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
      ins = (dims[0],) + tuple(dims[:-1])
      self.stages = nn.Sequential(*[Stage(i, d, n) for i, d, n in zip(ins, dims, depths)])
      self.norm_pre = nn.Identity()
      self.head = Head(dims[-1], num_classes)

    def forward(self, x):
      return self.head(self.norm_pre(self.stages(self.stem(x))))

  torch.manual_seed(seed)
  model = ConvNeXt()
  with torch.no_grad():
    for name, param in model.named_parameters():
      is_norm = ".norm." in name or ".downsample.0." in name or name.startswith("stem.1.")
      if name.endswith("gamma"):  # Layer scales learn to be small but far from 1e-6.
        param.uniform_(0.05, 0.3)
      elif is_norm and name.endswith("weight"):
        param.uniform_(0.5, 1.5)
      elif is_norm:
        param.normal_(0.0, 0.1)
    model.head.fc.weight.mul_(10.0)  # Logits of order 1.
  return model.eval()


def torch_logits(model, images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """The PyTorch model's logits for uint8 NHWC images, normalized as jaxcls does."""
  import torch
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  x = torch.from_numpy(((images.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2))
  with torch.no_grad():
    return model(x).numpy()


def state_dict_arrays(model) -> dict:
  """The model's state dict as float32 numpy arrays, without batch-norm step counters."""
  return {k: v.numpy() for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}
