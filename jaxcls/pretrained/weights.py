"""Weights files: reading a PyTorch state dict, and what published weights come with.

A `.safetensors` file is read with the `safetensors` library (no torch needed); a
`.pth`/`.pt`/`.bin` file with `torch.load(..., weights_only=True)`, which never runs code
from the file and needs PyTorch.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pickle
import re

import numpy as np

from jaxcls.errors import JaxclsError

# torchvision's (and timm's default) ImageNet normalization, scaled to 0..255 pixels.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class WeightsError(JaxclsError, ValueError):
  """The weights cannot be had or read, or do not fit the architecture."""


class DownloadError(WeightsError):
  """Published weights are not in their cache and cannot be downloaded now."""


@dataclasses.dataclass(frozen=True)
class Release:
  """A weights file on disk and what its publisher says about it."""
  arch: str  # The jaxcls model.name.
  path: str  # The file: a .safetensors or a PyTorch state dict.
  origin: str  # What was asked for: "hf-hub:timm/resnet50.tv2_in1k", or the file.
  mean: tuple[float, ...] = IMAGENET_MEAN  # Input normalization, 0..255 units.
  std: tuple[float, ...] = IMAGENET_STD
  class_names: tuple[str, ...] | None = None  # None: "0", "1", ...
  image_size: int = 224  # The evaluation size the publisher recommends.


def imagenet_class_names() -> tuple[str, ...]:
  """The 1000 ImageNet-1k class names in the order of the classifier's outputs
  (torchvision's short names: "tench", "goldfish", ...), shipped with jaxcls."""
  text = importlib.resources.files(__package__).joinpath(
      "imagenet_classes.txt").read_text(encoding="utf-8")
  return tuple(line for line in text.splitlines() if line)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file (WeightsError if its header or size is wrong)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except (SafetensorError, OSError) as e:
    raise WeightsError(f"'{path}' is not a readable .safetensors file ({e}).") from None


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ModuleNotFoundError:
    raise WeightsError(
        f"Reading '{path}' needs PyTorch: pip install 'jaxcls[torch]' (a CPU build is "
        "enough), or convert the file to .safetensors.") from None
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
    raise WeightsError(f"'{path}' cannot be read as a PyTorch state dict ({e}).") from None
  for key in ("state_dict", "model"):  # Training checkpoints wrap the state dict.
    if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
      loaded = loaded[key]
  if not isinstance(loaded, dict):
    raise WeightsError(f"'{path}' holds a {type(loaded).__name__}, not a state dict.")
  return {name: value.detach().float().numpy() if value.is_floating_point()
          else value.numpy()
          for name, value in loaded.items() if isinstance(value, torch.Tensor)}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict as numpy arrays (float32), without a `module.` prefix."""
  if not os.path.isfile(path):
    raise WeightsError(f"No weights file at '{path}'.")
  if path.endswith(".safetensors"):
    tensors = read_safetensors(path)
  else:
    tensors = _read_torch(path)
  return {re.sub(r"^module\.", "", name): np.asarray(value, np.float32)
          for name, value in tensors.items()}
