"""ResNet-9 for photos: the small residual network of configs/catdog.py.

The layout of the DAWNBench CIFAR-10 ResNet-9 (a preparation convolution; three stages of
3×3 conv + batch norm + ReLU + 2×2 max pool; a residual block after the first and the
last stage; global average pooling), changed for photos: the preparation convolution has
stride 2, and `resnet9_s4` adds a 2×2 max pool after it, so the later layers of a 128 px
photo cost what a 32 px image costs (0.17 GFLOP per 128 px image with widths
(32, 64, 128, 256), against 1.6 GFLOP for the plain CNN of the same widths). The
residual blocks are ResNet basic blocks whose last batch-norm scale starts at zero.
Measured on real photos: configs/catdog.py's docstring and benchmarks/README.md.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class ConvNormReLU(nn.Module):
  """3×3 convolution (no bias: batch norm follows), batch norm, ReLU."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), strides=(self.stride, self.stride),
                use_bias=False, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     axis_name=self.axis_name if train else None, dtype=self.dtype)(x)
    return nn.relu(x)


class ResidualPair(nn.Module):
  """relu(x + bn(conv(relu(bn(conv(x)))))), a ResNet basic block.

  `zero_init` starts the second batch norm's scale at zero, so the block starts as the
  identity and the network as a shallower one, which trains faster early on (Goyal et
  al., 2017). The ReLU after the sum, not inside the branch, lets that scale learn.
  """
  features: int
  zero_init: bool = True
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    y = ConvNormReLU(self.features, dtype=self.dtype, axis_name=self.axis_name)(x, train)
    y = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     axis_name=self.axis_name if train else None, dtype=self.dtype,
                     scale_init=(nn.initializers.zeros_init() if self.zero_init
                                 else nn.initializers.ones_init()))(y)
    return nn.relu(x + y)


class ResNet9(nn.Module):
  """[N, H, W, 3] normalized images → [N, widths[-1]] features.

  `widths` = (preparation, stage 1, stage 2, stage 3). The residual pairs sit after
  stages 1 and 3 (`residual_stages`). `stem_stride` 2 halves the resolution at once.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_stride: int = 2
  residual_stages: Sequence[int] = (1, 3)
  zero_init: bool = True
  stem_pool: bool = False
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    layer = functools.partial(ConvNormReLU, dtype=self.dtype, axis_name=self.axis_name)
    x = layer(self.widths[0], stride=self.stem_stride)(x, train)
    if self.stem_pool:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    for stage, width in enumerate(self.widths[1:], start=1):
      x = layer(width)(x, train)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      if stage in self.residual_stages:
        x = ResidualPair(width, self.zero_init, self.dtype, self.axis_name)(x, train)
    return jnp.mean(x, axis=(1, 2))
