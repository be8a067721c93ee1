"""ConvNeXt backbones (Liu et al., "A ConvNet for the 2020s") in timm's layout.

Module names follow timm's state-dict keys, a dot before a number written as an
underscore, so `jaxcls.pretrained` converts timm's weights by renaming and transposing:

    stem_0                     4×4 stride-4 patch convolution    (timm: stem.0)
    stem_1                     LayerNorm                         (stem.1)
    stages_I/downsample_0      LayerNorm, stages 1-3             (stages.I.downsample.0)
    stages_I/downsample_1      2×2 stride-2 convolution          (stages.I.downsample.1)
    stages_I/blocks_J/conv_dw  7×7 depthwise convolution         (...blocks.J.conv_dw)
    stages_I/blocks_J/norm     LayerNorm over channels           (...blocks.J.norm)
    stages_I/blocks_J/mlp      fc1 (×4 width), exact GELU, fc2   (...blocks.J.mlp.fc1/fc2)
    stages_I/blocks_J/gamma    layer scale, one value a channel  (...blocks.J.gamma)
    head_norm                  LayerNorm of the pooled features  (head.norm)

timm's classifier `head.fc` is jaxcls's head. These are the variants with a linear MLP
(`conv_mlp=False`: tiny, small, base, large); timm's atto-to-nano variants use 1×1
convolutions there and are not included. Every LayerNorm has epsilon 1e-6 and computes
its variance in two passes, as PyTorch does. Stochastic depth (timm's
`drop_path_rate`) is not implemented: it is 0 in timm's defaults and does nothing at
inference, so pretrained weights give timm's outputs; fine-tuning runs without it.
There is no batch norm, so a ConvNeXt has no `batch_stats`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# timm initializes convolutions and linear layers with a normal of std 0.02, biases 0.
_init = nn.initializers.truncated_normal(0.02)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


class Mlp(nn.Module):
  """Linear (`fc1`, `hidden` wide), exact GELU (PyTorch's default), linear (`fc2`)."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_init, name="fc1")(x)
    y = nn.gelu(y, approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_init, name="fc2")(y)


class Block(nn.Module):
  """x + γ · MLP(LayerNorm(depthwise 7×7 conv(x)))."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    y = nn.Conv(dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=dim,
                dtype=self.dtype, kernel_init=_init, name="conv_dw")(x)
    y = Mlp(4 * dim, self.dtype, name="mlp")(_layer_norm("norm", self.dtype)(y))
    gamma = self.param("gamma", nn.initializers.constant(1e-6), (dim,))
    return x + y * gamma.astype(y.dtype)


class Stage(nn.Module):
  """A LayerNorm + 2×2 stride-2 convolution (all but the first stage), then blocks."""
  depth: int
  dim: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.downsample:
      x = _layer_norm("downsample_0", self.dtype)(x)
      x = nn.Conv(self.dim, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                  kernel_init=_init, name="downsample_1")(x)
    for index in range(self.depth):
      x = Block(self.dtype, name=f"blocks_{index}")(x)
    return x


class ConvNeXt(nn.Module):
  """[N, H, W, 3] normalized images → pooled, normalized features [N, dims[-1]]."""
  depths: Sequence[int]
  dims: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No batch norm, dropout or stochastic depth in the backbone.
    x = nn.Conv(self.dims[0], (4, 4), strides=(4, 4), padding="VALID", dtype=self.dtype,
                kernel_init=_init, name="stem_0")(x)
    x = _layer_norm("stem_1", self.dtype)(x)
    for stage, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      x = Stage(depth, dim, stage > 0, self.dtype, name=f"stages_{stage}")(x)
    return _layer_norm("head_norm", self.dtype)(jnp.mean(x, axis=(1, 2)))


# timm's variants with a linear MLP: blocks per stage and channels per stage.
ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}


def convnext(arch: str, dtype: Any = jnp.float32) -> ConvNeXt:
  depths, dims = ARCHS[arch]
  return ConvNeXt(depths=depths, dims=dims, dtype=dtype)
