"""The wrapper every model shares: input normalization, a backbone and a dense head."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class Classifier(nn.Module):
  """uint8 or float images in [0, 255] → logits [N, num_classes] (float32).

  Normalization is the first layer, so whoever calls the model (train, eval, predict,
  an exported program) normalizes exactly the way training did.
  """
  backbone: nn.Module
  num_classes: int
  dropout: float = 0.0
  mean: Sequence[float] = (127.5, 127.5, 127.5)
  std: Sequence[float] = (127.5, 127.5, 127.5)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    features = self.backbone(x.astype(self.dtype), train=train)
    x = nn.Dropout(self.dropout, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)
