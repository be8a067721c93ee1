"""PyTorch names of jaxcls's variables, and the conversion: renaming plus transposes.

jaxcls's ResNets follow torchvision's module names and its ConvNeXts timm's, with a dot
before a number written as an underscore (`layer1_0` is `layer1.0`, `stages_2` is
`stages.2`), so a flax variable's path gives its PyTorch name. Convolution kernels go
from PyTorch's [out, in, kh, kw] to flax's [kh, kw, in, out] (a depthwise kernel
[C, 1, 7, 7] to [7, 7, 1, C]), linear weights from [out, in] to [in, out].
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import numpy as np

from jaxcls.models.convnext import ARCHS as CONVNEXT_ARCHS
from jaxcls.models.resnet import ARCHS as RESNET_ARCHS
from jaxcls.pretrained.weights import WeightsError


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one family's module names differ from the plain `name_N` → `name.N` rule."""
  classifier: str  # The PyTorch module of the output layer (jaxcls's `head`).
  renames: dict[str, str]  # Flax module names the rule does not cover.


RESNET = Layout("fc", {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"})
CONVNEXT = Layout("head.fc", {"head_norm": "head.norm"})
# Every model.name whose weights convert.
LAYOUTS: dict[str, Layout] = {**{arch: RESNET for arch in RESNET_ARCHS},
                              **{arch: CONVNEXT for arch in CONVNEXT_ARCHS}}

# flax leaf name → PyTorch's; other leaves (ConvNeXt's `gamma`) keep their name.
_LEAVES = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
           "var": "running_var"}


def layout(arch: str) -> Layout:
  if arch not in LAYOUTS:
    raise WeightsError(f"Weights for '{arch}' cannot be converted; jaxcls converts "
                       f"{sorted(LAYOUTS)}.")
  return LAYOUTS[arch]


def torch_name(path: Sequence[str], arch: str) -> str:
  """("backbone", "layer1_0", "conv1", "kernel") → "layer1.0.conv1.weight"."""
  rules = layout(arch)
  *modules, leaf = path
  if modules[0] == "head":
    prefix = rules.classifier
  else:  # Drop "backbone".
    prefix = ".".join(rules.renames.get(m) or re.sub(r"_(\d+)$", r".\1", m)
                      for m in modules[1:])
  return f"{prefix}.{_LEAVES.get(leaf, leaf)}"


def to_flax(value: np.ndarray) -> np.ndarray:
  """A PyTorch weight in flax's layout (a no-op for vectors)."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def output_count(state_dict: dict[str, np.ndarray], arch: str, where: str) -> int:
  """How many classes the weights' classifier has."""
  name = f"{layout(arch).classifier}.weight"
  if name not in state_dict:
    raise WeightsError(f"'{where}' has no '{name}': not the state dict of a "
                       f"torchvision/timm {arch}. Check --arch.")
  return state_dict[name].shape[0]


def convert(state_dict: dict[str, np.ndarray], abstract: dict, arch: str) -> dict:
  """Fills the variables `abstract` ({"params", "batch_stats"} of shapes) from torch names.

  Raises WeightsError naming every missing, unexpected or wrongly shaped tensor.
  """
  used, problems = set(), []

  def fill(path, leaf):
    name = torch_name([getattr(k, "key", str(k)) for k in path][1:], arch)  # No collection.
    if name not in state_dict:
      problems.append(f"missing '{name}'")
      return np.zeros(leaf.shape, np.float32)
    used.add(name)
    value = to_flax(state_dict[name])
    if value.shape != tuple(leaf.shape):
      problems.append(f"'{name}' has shape {state_dict[name].shape}, which does not give "
                      f"{tuple(leaf.shape)}")
      return np.zeros(leaf.shape, np.float32)
    return np.ascontiguousarray(value, np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, abstract)
  unexpected = sorted(k for k in state_dict
                      if k not in used and not k.endswith("num_batches_tracked"))
  problems += [f"unexpected '{k}'" for k in unexpected]
  if problems:
    shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
    raise WeightsError(f"The weights do not fit {arch} ({len(problems)} problems: "
                       f"{shown}). Check --arch.")
  return variables
