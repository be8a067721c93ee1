"""Models by name. Every model is a `Classifier`: normalize → backbone → head.

Parameters are grouped as {"backbone": ..., "head": ...}, so freezing, transfer learning
and per-group learning rates address the same two names whatever the architecture.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxcls.models.classifier import Classifier
from jaxcls.models.cnn import CNN

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


def create_model(model_config, num_classes: int, axis_name: str | None = None) -> Classifier:
  """Builds the configured classifier.

  `axis_name` is the pmap axis over which batch-norm statistics are averaged during
  training; leave it None for inference outside pmap.
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
      dtype=dtype)
