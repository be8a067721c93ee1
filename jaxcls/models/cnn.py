"""A small from-scratch CNN: conv blocks with batch norm, global average pooling."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class ConvBlock(nn.Module):
  """Two 3×3 conv + batch norm + ReLU layers, then 2×2 max pooling."""
  features: int
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             axis_name=self.axis_name if train else None,
                             dtype=self.dtype)
    for _ in range(2):
      x = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(norm()(x))
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class CNN(nn.Module):
  """[N, H, W, 3] normalized images → [N, widths[-1]] features."""
  widths: Sequence[int] = (32, 64, 128)
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    for width in self.widths:
      x = ConvBlock(width, self.dtype, self.axis_name)(x, train)
    return jnp.mean(x, axis=(1, 2))
