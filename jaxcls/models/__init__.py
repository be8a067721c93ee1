"""Models by name. Every model is a `Classifier`: normalize → backbone → head.

Parameters are grouped as {"backbone": ..., "head": ...}, so freezing, transfer learning
and per-group learning rates address the same two names whatever the architecture.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcls.models.classifier import Classifier
from jaxcls.models.cnn import CNN
from jaxcls.models.resnet import ARCHS as RESNET_ARCHS
from jaxcls.models.resnet import resnet
from jaxcls.models import onednn

# name → function(model_config, dtype, axis_name) → backbone module.
BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  def wrap(fn):
    BACKBONES[name] = fn
    return fn
  return wrap


@register("cnn")
def _cnn(model_config, dtype, axis_name):
  return CNN(widths=tuple(model_config.widths), dtype=dtype, axis_name=axis_name)


def _register_resnet(arch: str):
  @register(arch)
  def build(model_config, dtype, axis_name):
    del model_config  # The depth is in the name.
    return resnet(arch, dtype=dtype, axis_name=axis_name)


for _arch in RESNET_ARCHS:
  _register_resnet(_arch)


def create_model(model_config, num_classes: int, axis_name: str | None = None, *,
                 backbone_bn_train: bool = True) -> Classifier:
  """Builds the configured classifier.

  `axis_name` is the pmap axis over which batch-norm statistics are averaged during
  training; leave it None for inference outside pmap. `backbone_bn_train=False` keeps
  the backbone's batch norm in inference mode while training (fine-tuning a frozen
  backbone).
  """
  if model_config.name not in BACKBONES:
    raise ValueError(f"Unknown model.name '{model_config.name}'; choose one of "
                     f"{sorted(BACKBONES)}.")
  dtype = jnp.dtype(model_config.dtype)
  return Classifier(
      backbone=BACKBONES[model_config.name](model_config, dtype, axis_name),
      num_classes=num_classes,
      dropout=model_config.dropout,
      mean=tuple(model_config.input_mean),
      std=tuple(model_config.input_std),
      dtype=dtype,
      head_hidden=tuple(model_config.head_hidden),
      backbone_bn_train=backbone_bn_train)


def flops_per_image(model: Classifier, variables: Any, image_size: int) -> float | None:
  """XLA's cost analysis of the compiled inference forward pass on one image.

  A multiply-add counts as two FLOPs (ResNet-50 at 224 px: about 8.0e9). `variables`
  may be abstract (`jax.ShapeDtypeStruct`s): nothing runs. None if the backend gives no
  estimate.
  """
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  forward = jax.jit(functools.partial(model.apply, train=False))
  with onednn.disabled():  # XLA counts nothing inside oneDNN's convolutions.
    cost = forward.lower(variables, images).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None
