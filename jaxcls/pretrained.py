"""Import torchvision / timm ResNet weights as a jaxcls workdir.

    jaxcls-pretrained import --arch resnet50 --weights resnet50.pth \
        --out /tmp/resnet50_imagenet [--classes imagenet_classes.txt] [--image-size 224]

(the program is `jaxcls/cli/pretrained.py`; `python -m jaxcls.pretrained` still works).

`--weights` is a PyTorch state dict: a `.pth`/`.pt`/`.bin` file (read with
`torch.load(..., weights_only=True)`, so it never runs code from the file; needs torch)
or a `.safetensors` file (read here, no torch needed). torchvision and timm ResNets use
the same parameter names (`conv1.weight`, `layer1.0.bn1.running_mean`, ..., `fc.weight`).

The result is an ordinary workdir: `jaxcls-predict --workdir OUT IMAGE`
classifies with it (class names `0`…`999` unless `--classes` names them), and
`init_from = OUT` starts a new run from its backbone. It normalizes inputs with
ImageNet's mean and std (in 0..255 units), as torchvision's weights expect, and
preprocesses with the project's own `load_image`, so a 224×224 image reaches the network
unchanged except for that normalization.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from typing import Any, Sequence

import jax
import ml_dtypes
import numpy as np

from jaxcls import checkpoint
from jaxcls import config as config_lib
from jaxcls import optim
from jaxcls import workdir as workdir_lib
from jaxcls.errors import JaxclsError
from jaxcls.models import create_model
from jaxcls.models.resnet import ARCHS
from jaxcls.steps import TrainState, apply_model, create_train_state

# torchvision's ImageNet normalization, scaled to 0..255 pixels.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class WeightsError(JaxclsError, ValueError):
  """The weights file cannot be read or does not fit the architecture."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file: an 8-byte header length, a JSON header, raw data."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise WeightsError(f"'{path}' is too short to be a .safetensors file.")
  (header_len,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + header_len])
  except (ValueError, UnicodeDecodeError):
    raise WeightsError(f"'{path}' has no valid .safetensors header.") from None
  body = memoryview(data)[8 + header_len:]
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_DTYPES:
      raise WeightsError(f"Tensor '{name}' in '{path}' has dtype {info.get('dtype') if isinstance(info, dict) else info!r}; "
                         f"expected one of {sorted(_SAFETENSORS_DTYPES)}.")
    try:
      begin, end = info["data_offsets"]
      array = np.frombuffer(body[begin:end], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
      tensors[name] = array.reshape(info["shape"])
    except (KeyError, TypeError, ValueError) as e:
      raise WeightsError(f"Tensor '{name}' in '{path}' is malformed ({e}).") from None
  return tensors


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


def _torch_prefix(path: Sequence[str]) -> str:
  """A flax module path → the torchvision module name ('layer1_0' → 'layer1.0')."""
  parts = []
  for name in path:
    if name == "downsample_conv":
      parts.append("downsample.0")
    elif name == "downsample_bn":
      parts.append("downsample.1")
    elif re.fullmatch(r"layer\d+_\d+", name):
      parts.append(name.replace("_", "."))
    else:
      parts.append(name)
  return ".".join(parts)


# flax leaf name → (torch leaf name, how to turn the torch array into the flax one).
_LEAVES = {
    "scale": ("weight", lambda w: w),
    "bias": ("bias", lambda w: w),
    "mean": ("running_mean", lambda w: w),
    "var": ("running_var", lambda w: w),
}


def _torch_source(path: Sequence[str]) -> tuple[str, Any]:
  *modules, leaf = path
  if modules[0] == "head":  # The output layer is torchvision's `fc`.
    if leaf == "kernel":
      return "fc.weight", lambda w: w.T
    return f"fc.{leaf}", lambda w: w
  prefix = _torch_prefix(modules[1:])  # Drop "backbone".
  if leaf == "kernel":  # [out, in, kh, kw] → [kh, kw, in, out].
    return f"{prefix}.weight", lambda w: w.transpose(2, 3, 1, 0)
  name, convert = _LEAVES[leaf]
  return f"{prefix}.{name}", convert


def convert(state_dict: dict[str, np.ndarray], abstract: dict) -> dict:
  """Fills the variables `abstract` ({"params", "batch_stats"} of shapes) from torch names.

  Raises WeightsError naming every missing, unexpected or wrongly shaped tensor.
  """
  used, problems = set(), []

  def fill(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path][1:]  # Drop the collection.
    name, transform = _torch_source(names)
    if name not in state_dict:
      problems.append(f"missing '{name}'")
      return np.zeros(leaf.shape, np.float32)
    used.add(name)
    value = transform(state_dict[name])
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
    raise WeightsError(f"The weights do not fit this architecture ({len(problems)} "
                       f"problems: {shown}). Check --arch.")
  return variables


def imported_config(arch: str, image_size: int):
  config = config_lib.base_config()
  config.model.name = arch
  config.model.dropout = 0.0
  config.model.input_mean = IMAGENET_MEAN
  config.model.input_std = IMAGENET_STD
  config.data.image_size = image_size
  return config


def _class_names(classes_file: str | None, num_classes: int) -> list[str]:
  if classes_file is None:
    return [str(i) for i in range(num_classes)]
  with open(classes_file, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  if len(names) != num_classes:
    raise WeightsError(f"'{classes_file}' names {len(names)} classes, but the weights "
                       f"have {num_classes} outputs; give one name per line.")
  return names


def import_weights(arch: str, weights: str, out: str, classes_file: str | None = None,
                   image_size: int = 224) -> str:
  """Converts `weights` into a workdir at `out` (a checkpoint at step 0); returns `out`."""
  if arch not in ARCHS:
    raise WeightsError(f"Unknown --arch '{arch}'; choose one of {sorted(ARCHS)}.")
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(checkpoint.checkpoint_dir(out)):
    raise WeightsError(f"'{out}' already holds checkpoints; choose a new --out.")
  state_dict = read_state_dict(weights)
  if "fc.weight" not in state_dict:
    raise WeightsError(f"'{weights}' has no 'fc.weight': not a torchvision/timm ResNet "
                       "state dict.")
  num_classes = state_dict["fc.weight"].shape[0]
  class_names = _class_names(classes_file, num_classes)
  config = imported_config(arch, image_size)
  model = create_model(config.model, num_classes)
  target = jax.eval_shape(lambda: create_train_state(config, model, jax.random.key(0), 1))
  variables = convert(state_dict, {"params": target.params,
                                   "batch_stats": target.batch_stats})
  tx = optim.create_optimizer(config.optim, 1, config.num_epochs)
  state = TrainState.create(apply_fn=apply_model(model), params=variables["params"], tx=tx,
                            batch_stats=variables["batch_stats"])
  out = workdir_lib.prepare(out)
  workdir_lib.write_config(out, config)
  mngr = checkpoint.manager(out, keep=1)
  workdir_lib.save_checkpoint(mngr, state, workdir_lib.RunMeta(
      config=config.to_dict(), class_names=tuple(class_names), step=0, epoch=0,
      imported_from={"arch": arch, "weights": os.path.abspath(weights)}))
  mngr.wait_until_finished()
  mngr.close()
  return out


if __name__ == "__main__":  # `python -m jaxcls.pretrained`, kept for one release.
  from jaxcls.cli.pretrained import cli
  cli()
