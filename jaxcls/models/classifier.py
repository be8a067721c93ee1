"""The wrapper every model shares: input normalization, a backbone and a dense head."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class Head(nn.Module):
  """Optional hidden ReLU layers (`hidden_0`, ...) computing in `dtype`, then the
  output layer, in float32.

  The output layer's `kernel` and `bias` sit directly in the head's parameters, so a
  head without hidden layers has exactly the parameters of a plain Dense layer: a
  checkpoint's `params["head"]` is `{"kernel", "bias"}` either way, plus the hidden
  layers when there are some.
  """
  num_classes: int
  hidden: Sequence[int] = ()
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.hidden):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"hidden_{i}")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,))
    # The output layer computes in float32 whatever `dtype` is: bfloat16 logits would
    # carry 8 bits into the softmax and the loss, and this matmul is tiny.
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=jnp.float32)
    return x @ kernel + bias


class Classifier(nn.Module):
  """uint8 or float images in [0, 255] → logits [N, num_classes] (float32).

  Normalization is the first layer, so whoever calls the model (train, eval, predict,
  an exported program) normalizes exactly the way training did.

  `backbone_bn_train=False` keeps the backbone's batch norm in inference mode (running
  statistics, never updated) even when training: the standard way to fine-tune a
  pretrained backbone that was first frozen, whose statistics came from far more data.

  `flip_test`: outside training, the logits are the mean of the image's and its
  mirror's (test-time augmentation, twice the inference cost), in every program that
  runs the model: validation, evaluate, predict, export, serve.
  """
  backbone: nn.Module
  num_classes: int
  dropout: float = 0.0
  mean: Sequence[float] = (127.5, 127.5, 127.5)
  std: Sequence[float] = (127.5, 127.5, 127.5)
  dtype: Any = jnp.float32
  head_hidden: Sequence[int] = ()
  backbone_bn_train: bool = True
  flip_test: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    mirrored = self.flip_test and not train
    if mirrored:  # One pass over [images; mirrors]: the same weights, a double batch.
      x = jnp.concatenate([x, x[:, :, ::-1, :]])
    features = self.backbone(x.astype(self.dtype), train=train and self.backbone_bn_train)
    logits = Head(self.num_classes, tuple(self.head_hidden), self.dropout, self.dtype,
                  name="head")(features, train=train).astype(jnp.float32)
    if mirrored:
      logits = jnp.mean(logits.reshape((2, -1) + logits.shape[1:]), axis=0)
    return logits
