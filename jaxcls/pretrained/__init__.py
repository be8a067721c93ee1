"""Published weights as jaxcls models: torchvision and timm ResNets, timm ConvNeXts.

Where the weights come from (`source`):

    hf-hub:timm/resnet50.tv2_in1k    timm's safetensors on the Hugging Face hub, with
                                     the normalization and input size of its config.json
                                     (hub.py; the hub's own cache, no torch needed)
    torchvision:resnet50             torchvision's release file (torch_hub.py; torch
                                     hub's checkpoint folder; needs torch to read)
    /path/to/weights.pth             a local state dict (.pth/.pt/.bin needs torch;
                                     .safetensors does not), with --arch

Two uses:

- `init_from = "hf-hub:..."` (or `torchvision:...`) in a config: `load` converts the
  weights in memory and the run starts from their backbone (jaxcls.transfer).
- `jaxcls-pretrained import --weights SOURCE --out DIR` (`import_weights`): an ordinary
  workdir, a checkpoint at step 0, that `jaxcls-predict --workdir DIR IMAGE` classifies
  with (ImageNet's class names for published ImageNet weights) and that `init_from=DIR`
  starts a run from.

The input normalization (in 0..255 units) and class names come with the weights, and the
project's own `load_image` preprocesses, so an image of the model's size reaches the
network unchanged except for that normalization.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections

from jaxcls import checkpoint
from jaxcls import config as config_lib
from jaxcls import optim
from jaxcls import workdir as workdir_lib
from jaxcls.models import create_model
from jaxcls.pretrained import hub, torch_hub
from jaxcls.pretrained.names import LAYOUTS, convert, output_count
from jaxcls.pretrained.weights import (IMAGENET_MEAN, IMAGENET_STD, DownloadError,
                                       Release, WeightsError, imagenet_class_names,
                                       read_safetensors, read_state_dict)
from jaxcls.steps import TrainState, apply_model

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DownloadError", "Imported", "LAYOUTS",
           "Release", "WeightsError", "convert", "imagenet_class_names", "import_weights",
           "is_published", "load", "read_safetensors", "read_state_dict", "resolve"]


def is_published(source: str) -> bool:
  """True for `hf-hub:...` and `torchvision:...`."""
  return source.startswith((hub.SCHEME, torch_hub.SCHEME))


def resolve(source: str, arch: str | None = None) -> Release:
  """The weights file for `source` on disk (downloaded into its cache if need be)."""
  if source.startswith(hub.SCHEME):
    release = hub.fetch(source[len(hub.SCHEME):])
  elif source.startswith(torch_hub.SCHEME):
    release = torch_hub.fetch(source[len(torch_hub.SCHEME):])
  else:
    if arch is None:
      raise WeightsError(f"'{source}' is a local file: say which architecture it holds "
                         f"with --arch (one of {sorted(LAYOUTS)}).")
    return Release(arch=arch, path=os.path.abspath(os.path.expanduser(source)),
                   origin=os.path.abspath(os.path.expanduser(source)))
  if arch is not None and arch != release.arch:
    raise WeightsError(f"{source} holds a {release.arch}, not a {arch}; leave out --arch "
                       "(published weights say what they are).")
  return release


def imported_config(release: Release, image_size: int) -> ml_collections.ConfigDict:
  """The config of a model made from `release`: its architecture and normalization."""
  config = config_lib.base_config()
  config.model.name = release.arch
  config.model.dropout = 0.0
  config.model.input_mean = tuple(release.mean)
  config.model.input_std = tuple(release.std)
  config.data.image_size = image_size
  return config


@dataclasses.dataclass
class Imported:
  """Converted weights: the model's config, class names and variables (host arrays)."""
  release: Release
  config: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  variables: dict  # {"params": ..., "batch_stats": ...}; no batch_stats for ConvNeXt.


def _class_names(release: Release, classes_file: str | None,
                 num_classes: int) -> tuple[str, ...]:
  if classes_file is not None:
    with open(classes_file, encoding="utf-8") as f:
      names = tuple(line.strip() for line in f if line.strip())
    where = f"'{classes_file}'"
  elif release.class_names is not None:
    names, where = release.class_names, f"{release.origin}'s configuration"
  else:
    return tuple(str(i) for i in range(num_classes))
  if len(names) != num_classes:
    raise WeightsError(f"{where} names {len(names)} classes, but the weights have "
                       f"{num_classes} outputs; give one name per line (--classes).")
  return names


def load(source: str, arch: str | None = None, classes_file: str | None = None,
         image_size: int | None = None) -> Imported:
  """Converts the weights of `source` (see the module docstring) into jaxcls variables."""
  release = resolve(source, arch)
  state_dict = read_state_dict(release.path)
  num_classes = output_count(state_dict, release.arch, release.origin)
  config = imported_config(release, image_size or release.image_size)
  model = create_model(config.model, num_classes)
  size = config.data.image_size
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, size, size, 3), jnp.uint8)))
  variables = convert(state_dict, dict(abstract), release.arch)
  return Imported(release, config, _class_names(release, classes_file, num_classes),
                  variables)


def import_weights(arch: str | None, weights: str, out: str,
                   classes_file: str | None = None, image_size: int | None = None) -> str:
  """Converts `weights` (a file or a published source) into a workdir at `out` (a
  checkpoint at step 0); returns `out`."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(checkpoint.checkpoint_dir(out)):
    raise WeightsError(f"'{out}' already holds checkpoints; choose a new --out.")
  imported = load(weights, arch, classes_file, image_size)
  config, variables = imported.config, imported.variables
  model = create_model(config.model, len(imported.class_names))
  tx = optim.create_optimizer(config.optim, 1, config.num_epochs)
  state = TrainState.create(apply_fn=apply_model(model), params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats", {}))
  out = workdir_lib.prepare(out)
  workdir_lib.write_config(out, config)
  mngr = checkpoint.manager(out, keep=1)
  workdir_lib.save_checkpoint(mngr, state, workdir_lib.RunMeta(
      config=config.to_dict(), class_names=imported.class_names, step=0, epoch=0,
      imported_from={"arch": imported.release.arch, "weights": imported.release.origin,
                     "file": imported.release.path}))
  mngr.wait_until_finished()
  mngr.close()
  return out
