"""ResNet-18/34/50 backbones in torchvision's layout, so its weights convert one to one.

Module names follow torchvision's state-dict keys (`conv1`, `bn1`, `layer1_0/conv1`,
`layer1_0/downsample_conv`, ...; a dot becomes an underscore), which keeps the weight
converter in `jaxcls.pretrained` a renaming plus transposes. As in torchvision (v1.5),
a bottleneck block strides in its 3×3 convolution, and padding is explicit and
symmetric, so the same input gives the same output as the PyTorch model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

# He initialization on fan-out, as torchvision initializes its ResNets.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 kernel_init=_conv_init, name=name)


def _norm(train: bool, axis_name: str | None, dtype: Any) -> Callable[..., nn.BatchNorm]:
  # momentum 0.9 here is PyTorch's momentum 0.1; epsilon is PyTorch's default.
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, axis_name=axis_name if train else None,
                           dtype=dtype)


class BasicBlock(nn.Module):
  """Two 3×3 convolutions with a shortcut (ResNet-18/34)."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = _norm(train, self.axis_name, self.dtype)
    y = _conv(self.features, 3, self.stride, "conv1", self.dtype)(x)
    y = nn.relu(norm(name="bn1")(y))
    y = norm(name="bn2")(_conv(self.features, 3, 1, "conv2", self.dtype)(y))
    return nn.relu(y + _shortcut(x, self.features, self.stride, norm, self.dtype))


class Bottleneck(nn.Module):
  """1×1 reduce, 3×3 (strided), 1×1 expand ×4, with a shortcut (ResNet-50)."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = _norm(train, self.axis_name, self.dtype)
    y = nn.relu(norm(name="bn1")(_conv(self.features, 1, 1, "conv1", self.dtype)(x)))
    y = _conv(self.features, 3, self.stride, "conv2", self.dtype)(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(_conv(self.features * 4, 1, 1, "conv3", self.dtype)(y))
    return nn.relu(y + _shortcut(x, self.features * 4, self.stride, norm, self.dtype))


def _shortcut(x, features: int, stride: int, norm, dtype):
  """Identity, or torchvision's `downsample` (1×1 strided conv + batch norm)."""
  if stride == 1 and x.shape[-1] == features:
    return x
  return norm(name="downsample_bn")(_conv(features, 1, stride, "downsample_conv", dtype)(x))


class ResNet(nn.Module):
  """[N, H, W, 3] normalized images → pooled features [N, 512] (basic) or [N, 2048]."""
  stage_sizes: Sequence[int]
  block: type = BasicBlock
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _norm(train, self.axis_name, self.dtype)
    x = nn.relu(norm(name="bn1")(_conv(64, 7, 2, "conv1", self.dtype)(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for index in range(blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        x = self.block(64 * 2 ** stage, stride, self.dtype, self.axis_name,
                       name=f"layer{stage + 1}_{index}")(x, train)
    return jnp.mean(x, axis=(1, 2))


# torchvision's depths: blocks per stage and block type.
ARCHS: dict[str, tuple[tuple[int, ...], type]] = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
}


def resnet(arch: str, dtype: Any = jnp.float32, axis_name: str | None = None) -> ResNet:
  stage_sizes, block = ARCHS[arch]
  return ResNet(stage_sizes=stage_sizes, block=block, dtype=dtype, axis_name=axis_name)
