"""Models by name. Every model is a `Classifier`: normalize → backbone → head.

Parameters are grouped as {"backbone": ..., "head": ...}, so freezing, transfer learning
and per-group learning rates address the same two names whatever the architecture.

A backbone is any `flax.linen` module that maps normalized images [N, H, W, 3] to
features [N, D] and takes `train`. Register one under a name, from any file (a config
file, say), and `model.name` picks it:

    @jaxcls.models.register("mynet")
    def mynet(model_config, dtype, axis_name):
      return MyNet(dtype=dtype, axis_name=axis_name)

`axis_name` is the pmap axis to average batch-norm statistics over while training.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcls.errors import JaxclsError
from jaxcls.models.classifier import Classifier
from jaxcls.models.cnn import CNN
from jaxcls.models.convnext import ARCHS as CONVNEXT_ARCHS
from jaxcls.models.convnext import convnext
from jaxcls.models.resnet import ARCHS as RESNET_ARCHS
from jaxcls.models.resnet import resnet
from jaxcls.models.resnet9 import ResNet9

# name → function(model_config, dtype, axis_name) → backbone module.
BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  """Decorator: makes `model.name=name` build the backbone the function returns."""
  def wrap(fn):
    BACKBONES[name] = fn
    return fn
  return wrap


@register("cnn")
def _cnn(model_config, dtype, axis_name):
  return CNN(widths=tuple(model_config.widths), dtype=dtype, axis_name=axis_name)


@register("resnet9")
def _resnet9(model_config, dtype, axis_name):
  return ResNet9(widths=tuple(model_config.widths), dtype=dtype, axis_name=axis_name)


@register("resnet9_s4")
def _resnet9_s4(model_config, dtype, axis_name):
  return ResNet9(widths=tuple(model_config.widths), stem_pool=True, dtype=dtype,
                 axis_name=axis_name)


def _register_resnet(arch: str):
  @register(arch)
  def build(model_config, dtype, axis_name):
    del model_config  # The depth is in the name.
    return resnet(arch, dtype=dtype, axis_name=axis_name)


for _arch in RESNET_ARCHS:
  _register_resnet(_arch)


def _register_convnext(arch: str):
  @register(arch)
  def build(model_config, dtype, axis_name):
    del model_config, axis_name  # The size is in the name; there is no batch norm.
    return convnext(arch, dtype=dtype)


for _arch in CONVNEXT_ARCHS:
  _register_convnext(_arch)


class UnknownModelError(JaxclsError, ValueError):
  """`model.name` names no registered backbone."""


# Backends whose matrix units run bfloat16 at about twice float32's (TF32's) speed.
_BFLOAT16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def resolve_dtype(name: str, backend: str | None = None) -> jnp.dtype:
  """The dtype `model.dtype` asks for; "auto" is bfloat16 on GPUs and TPUs, float32
  on CPUs (XLA:CPU runs bfloat16 convolutions slower than float32 ones).

  `backend` defaults to JAX's default backend: "auto" is resolved where the model is
  built, so a checkpoint trained on a GPU computes in float32 on a CPU (its parameters
  are float32 either way).
  """
  if name != "auto":
    return jnp.dtype(name)
  backend = backend or jax.default_backend()
  return jnp.dtype(jnp.bfloat16 if backend in _BFLOAT16_BACKENDS else jnp.float32)


def create_model(model_config, num_classes: int, axis_name: str | None = None, *,
                 backbone_bn_train: bool = True) -> Classifier:
  """Builds the configured classifier.

  `axis_name` is the pmap axis over which batch-norm statistics are averaged during
  training; leave it None for inference outside pmap. `backbone_bn_train=False` keeps
  the backbone's batch norm in inference mode while training (fine-tuning a frozen
  backbone).
  """
  if model_config.name not in BACKBONES:
    raise UnknownModelError(
        f"model.name '{model_config.name}' is not a registered model; choose one of "
        f"{sorted(BACKBONES)}, or import the file that registers it with "
        "jaxcls.models.register first.")
  dtype = resolve_dtype(model_config.dtype)
  return Classifier(
      backbone=BACKBONES[model_config.name](model_config, dtype, axis_name),
      num_classes=num_classes,
      dropout=model_config.dropout,
      mean=tuple(model_config.input_mean),
      std=tuple(model_config.input_std),
      dtype=dtype,
      head_hidden=tuple(model_config.head_hidden),
      backbone_bn_train=backbone_bn_train,
      # Absent from the configs of runs saved before 0.3.
      flip_test=bool(model_config.get("flip_test", False)))
