"""Transfer learning: start a run from another model's backbone (`init_from`).

`init_from` is any jaxcls workdir (a finished run, or weights converted with
`jaxcls-pretrained import`), or published weights converted on the fly:
`hf-hub:timm/resnet50.tv2_in1k` (timm's safetensors, through the Hugging Face cache) or
`torchvision:resnet50` (torchvision's release file, through torch hub's cache); see
`jaxcls.pretrained`. The new run takes the source's backbone parameters and batch-norm
statistics, and its input normalization (a backbone only works on inputs normalized the
way it was trained), and puts a fresh head on top for its own classes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxcls import config as config_lib
from jaxcls import pretrained
from jaxcls import workdir as workdir_lib

log = logging.getLogger("jaxcls")

# Keys that describe the backbone and its input: the new run takes them from the source.
_ADOPTED_KEYS = ("widths", "input_mean", "input_std")


@dataclasses.dataclass
class Source:
  """A loaded source: its config, class names and variables (host arrays)."""
  workdir: str  # The workdir, or the published weights ("hf-hub:...").
  config: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  variables: dict


def load_source(workdir: str) -> Source:
  """Published weights (`hf-hub:...`, `torchvision:...`) converted, or the best (else
  the latest) checkpoint of `workdir` (ConfigError if it has none)."""
  if pretrained.is_published(workdir):
    imported = pretrained.load(workdir)
    return Source(workdir, imported.config, imported.class_names, imported.variables)
  workdir = os.path.expanduser(workdir)
  try:
    run = workdir_lib.load_run(workdir)
  except FileNotFoundError as e:
    raise config_lib.ConfigError(
        f"init_from='{workdir}' cannot be used: {e} Point init_from at a jaxcls workdir "
        "or at published weights (hf-hub:timm/resnet50.tv2_in1k, torchvision:resnet50), "
        f"or import a weights file first: jaxcls-pretrained import --arch resnet50 "
        f"--weights FILE --out {workdir}") from None
  return Source(workdir, run.config, run.class_names, jax.device_get(run.variables))


def adopt_source_model(config: ml_collections.ConfigDict,
                       source_config: ml_collections.ConfigDict,
                       where: str) -> ml_collections.ConfigDict:
  """A copy of `config` with the source's backbone shape and input normalization.

  `source_config` is the config of the init_from workdir `where`, or, when a run
  resumes, the config its own checkpoint was trained with (which already adopted them).
  """
  if config.model.name != source_config.model.name:
    raise config_lib.ConfigError(
        f"init_from='{where}' holds a {source_config.model.name} backbone, but "
        f"model.name is '{config.model.name}'. Set "
        f"--config.model.name={source_config.model.name}, or start from another workdir.")
  config = ml_collections.ConfigDict(config.to_dict())
  for key in _ADOPTED_KEYS:
    mine, theirs = tuple(config.model[key]), tuple(source_config.model[key])
    if mine != theirs:
      if key != "widths" or config.model.name == "cnn":  # Only the cnn has widths.
        log.info("init_from: model.%s=%s from the source (the config said %s).", key,
                 _short(theirs), _short(mine))
      config.model[key] = theirs
  return config


def _short(values: tuple) -> str:
  return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _check_same_shapes(name: str, target: Any, source: Any, workdir: str) -> None:
  want = jax.tree.map(np.shape, target)
  have = jax.tree.map(np.shape, source)
  if want != have:
    raise config_lib.ConfigError(
        f"The backbone {name} in init_from='{workdir}' do not fit this model "
        f"(shapes {have} vs {want}). Use the same model.name and model.widths as the "
        "source run.")


def transplant_backbone(state: Any, source: Source) -> Any:
  """`state` with the source's backbone params and batch stats and fresh optimizer state.

  The head keeps its fresh initialization; its shape follows this run's classes.
  """
  params = {**state.params, "backbone": source.variables["params"]["backbone"]}
  _check_same_shapes("parameters", state.params["backbone"], params["backbone"],
                     source.workdir)
  batch_stats = state.batch_stats
  if "backbone" in (batch_stats or {}):
    batch_stats = {**batch_stats,
                   "backbone": source.variables["batch_stats"]["backbone"]}
    _check_same_shapes("batch-norm statistics", state.batch_stats["backbone"],
                       batch_stats["backbone"], source.workdir)
  log.info("init_from: backbone from '%s' (trained on %d classes); new head for this "
           "run.", source.workdir, len(source.class_names))
  return state.replace(params=params, batch_stats=batch_stats,
                       opt_state=jax.jit(state.tx.init)(params))
