"""The configuration schema: every key a recipe may set, its default and its type.

Recipes in `configs/` start from `base_config()` and change what they need. A key that
is not here is a typo; `validate` names it (and the keys that do exist) instead of
letting it be silently ignored.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import sys
from types import ModuleType
from typing import Any

import ml_collections

from jaxcls.errors import JaxclsError


class ConfigError(JaxclsError, ValueError):
  """A configuration value is missing, unknown or out of range."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every recipe."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64  # Global: split evenly over all devices of all processes.
  c.num_epochs = 10
  # A workdir (a jaxcls run, or weights imported with `jaxcls-pretrained import`)
  # whose backbone and input normalization start this run; the head starts fresh.
  c.init_from = ""
  c.data = _data_defaults()
  c.augment = _augment_defaults()
  c.model = _model_defaults()
  c.optim = _optim_defaults()
  c.train = _train_defaults()
  c.checkpoint = _checkpoint_defaults()
  return c


def _data_defaults() -> ml_collections.ConfigDict:
  """Where the images come from and how they are read."""
  s = ml_collections.ConfigDict()
  # "tfds:NAME" (TensorFlow Datasets), "folder:PATH" (class subfolders), "zip:PATH"
  # (class folders inside a .zip, read in place) or "generated:shapes" (drawn on the fly).
  s.source = ""
  s.image_size = 64
  s.val_fraction = 0.2  # folder:, zip:, generated: (split by a hash of the path).
  s.train_split = "train"  # tfds: only, TFDS split syntax, e.g. "train[:80%]".
  s.val_split = "validation"  # tfds: only, e.g. "train[80%:]".
  s.tfds_data_dir = ""  # tfds: only; "" = TFDS's default (~/tensorflow_datasets).
  s.workers = 0  # Decode threads; 0 = one per CPU this process may use.
  # Decoded, resized uint8 images kept after their first decode: "none", "memory" or
  # "disk" (WORKDIR/cache/, reused by later runs), so later epochs decode no JPEG.
  s.cache = "none"
  s.generated_per_class = 300  # For "generated:" sources only.
  return s


def _augment_defaults() -> ml_collections.ConfigDict:
  """Random changes to training images (none at evaluation)."""
  s = ml_collections.ConfigDict()
  s.flip = True  # Random horizontal flip.
  s.rotation = 10.0  # Max degrees either way; 0 turns rotation off.
  s.scale = (0.9, 1.1)  # Min and max zoom; (1.0, 1.0) turns it off.
  # Random resized crop: the crop's share of the image area, and its aspect-ratio range
  # (the crop is resized to data.image_size); (1.0, 1.0) turns it off. The image is the
  # centre square the loader cut, not the whole photo as in torchvision and timm: on a
  # 4:3 photo, area (0.08, 1) here is (0.06, 0.75) of the photo (docs/training.md).
  s.crop_area = (1.0, 1.0)
  s.crop_ratio = (0.75, 4 / 3)
  # "none", "randaugment" (policy_ops operations at policy_magnitude of 30) or
  # "trivialaugment" (one operation per image, at a random magnitude).
  s.policy = "none"
  s.policy_ops = 2
  s.policy_magnitude = 9
  # Mixup and cutmix: Beta(alpha, alpha) mixing weights; 0 turns each off. With both on,
  # each batch uses one of the two.
  s.mixup_alpha = 0.0
  s.cutmix_alpha = 0.0
  return s


def _model_defaults() -> ml_collections.ConfigDict:
  """The network and its input normalization."""
  s = ml_collections.ConfigDict()
  s.name = "cnn"
  s.widths = (32, 64, 128)  # Channels of each conv block (cnn).
  s.dropout = 0.3
  s.head_hidden = ()  # Widths of hidden ReLU layers between backbone and output.
  # Validation and prediction average the logits of each image and its mirror (twice
  # the inference cost; training is unchanged).
  s.flip_test = False
  # What the layers compute in: "auto" (bfloat16 on GPUs and TPUs, float32 on CPUs,
  # decided on the machine that builds the model), "float32" or "bfloat16".
  # Parameters, batch-norm statistics, logits, loss and optimizer state stay float32.
  s.dtype = "auto"
  # Input normalization travels with the checkpoint: predict uses the same.
  s.input_mean = (127.5, 127.5, 127.5)
  s.input_std = (127.5, 127.5, 127.5)
  return s


def _optim_defaults() -> ml_collections.ConfigDict:
  """The optimizer, its schedule and its penalties."""
  s = ml_collections.ConfigDict()
  # "sgd" (with momentum; weight_decay is L2 added to the gradient) or "adamw" (Adam
  # with decoupled weight decay: weight_decay × learning rate × w subtracted each step).
  s.name = "sgd"
  s.learning_rate = 0.05
  s.momentum = 0.9  # sgd.
  s.nesterov = False  # sgd.
  s.beta1 = 0.9  # adamw.
  s.beta2 = 0.999  # adamw.
  s.eps = 1e-8  # adamw.
  s.weight_decay = 5e-4  # On the leaves named in decay_leaves.
  s.l1 = 0.0  # L1 on the same leaves.
  # Parameter names that weight decay and L1 apply to; add "bias" or "scale" to
  # penalize biases or batch-norm scales too.
  s.decay_leaves = ("kernel",)
  s.schedule = "cosine"  # "constant" | "cosine" | "step".
  s.warmup_epochs = 0.0
  s.step_epochs = ()  # "step": epochs at which the rate is multiplied by step_factor.
  s.step_factor = 0.1
  s.grad_clip_norm = 0.0  # Clip the global gradient norm to this; 0 = off.
  s.freeze = "none"  # "none" | "backbone" (train the head only).
  s.backbone_lr_mult = 1.0  # Backbone rate = this × learning rate.
  # An exponential moving average of the weights (and batch statistics), updated every
  # step with this decay (warmed up: (1 + step) / (10 + step) while that is smaller),
  # evaluated and checkpointed beside them; 0 turns it off.
  s.ema_decay = 0.0
  return s


def _train_defaults() -> ml_collections.ConfigDict:
  """The loop: logging, loss options, stopping, accumulation, tracking."""
  s = ml_collections.ConfigDict()
  s.log_every_steps = 50
  s.progress_bar = True
  s.label_smoothing = 0.0
  # With optim.freeze="backbone": train the whole network after this many epochs;
  # 0 keeps the backbone frozen for the whole run.
  s.unfreeze_after_epochs = 0
  s.log_images = 16  # Augmented training images shown in TensorBoard at step 0.
  # Stop after this many epochs without a better validation accuracy; 0 = never.
  s.early_stopping_patience = 0
  # Progressive resizing: training images are resized on the device to these sizes in
  # turn, each for an equal share of the epochs, e.g. (64, 96, 128): small images early
  # cost a fraction of a large one. Validation and predict always see data.image_size.
  # () trains at data.image_size throughout. One size below data.image_size trains there
  # and tests larger, e.g. (128,) with 152 in configs/catdog.py: random resized crops
  # show training a photo's subject larger than a whole-photo view at the same size does.
  s.progressive_sizes = ()
  # Gradient accumulation: each batch runs as this many micro-batches, one update. Batch
  # norm normalizes each micro-batch by its own statistics; the running statistics are
  # updated once per step with the mean of the micro-batches' statistics.
  s.accumulate_steps = 1
  # Per-class loss weights: one per class, or () for all alike. balance_classes instead
  # weighs each class by N / (classes × its count) in the training split.
  s.class_weights = ()
  s.balance_classes = False
  # Weights & Biases: a project name logs the run there (pip install 'jaxcls[wandb]';
  # WANDB_MODE=offline keeps it local); "" = off.
  s.wandb_project = ""
  return s


def _checkpoint_defaults() -> ml_collections.ConfigDict:
  """What is saved, how often."""
  s = ml_collections.ConfigDict()
  s.keep = 3  # The last N checkpoints; the best one is kept besides these.
  s.every_steps = 1000  # Also save every N steps (0 = at epoch ends only).
  s.async_save = True  # Write in a background thread while training goes on.
  return s

def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  items = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      items.update(_flatten(value, name + "."))
    else:
      items[name] = value
  return items


def flatten(config) -> dict[str, Any]:
  """{"optim.learning_rate": 0.05, ...}, with lists as tuples so saved and new compare."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in _flatten(config).items()}


def _type_ok(default: Any, value: Any) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(default, bool) and isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def _initials(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def closest_keys(key: str, known) -> list[str]:
  """Up to three known keys a mistyped `key` most likely meant.

  Spelling slips (difflib on the whole key and on its last part) and abbreviations by
  initials ("optim.lr" → optim.learning_rate, "optim.wd" → optim.weight_decay).
  """
  known = list(known)
  section, _, leaf = key.rpartition(".")
  found = [k for k in known if k.rpartition(".")[0] == section
           and _initials(k.rpartition(".")[2]) == leaf]
  found += difflib.get_close_matches(key, known, n=3, cutoff=0.6)
  leaves = {k.rpartition(".")[2]: k for k in known}
  found += [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=3,
                                                          cutoff=0.75)]
  return list(dict.fromkeys(found))[:3]


def unknown_key_error(key: str, known, given_as: str = "") -> ConfigError:
  """The error for a key the schema lacks, naming the closest known ones."""
  close = closest_keys(key, known)
  if close:
    hint = f" Did you mean {', '.join(close)}?"
  else:
    sections = sorted({k.split(".")[0] + (".*" if "." in k else "") for k in known})
    hint = f" Known keys: {', '.join(sections)} (all in jaxcls/config.py)."
  return ConfigError(f"Unknown config key '{key}'{given_as}.{hint}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first unknown key, wrong type or bad value."""
  known = _flatten(base_config())
  given = _flatten(config)
  for key, value in given.items():
    if key not in known:
      raise unknown_key_error(key, known)
    if not _type_ok(known[key], value):
      raise ConfigError(
          f"Config key '{key}' is {value!r} ({type(value).__name__}); expected a "
          f"{type(known[key]).__name__} like the default {known[key]!r}.")
  for key in known:
    if key not in given:
      raise ConfigError(f"Config key '{key}' is missing; start recipes from "
                        "jaxcls.config.base_config().")
  _check_values(config)


def _check_values(c: ml_collections.ConfigDict) -> None:
  def need(ok: bool, key: str, what: str):
    if not ok:
      value = c
      for part in key.split("."):
        value = value[part]
      raise ConfigError(f"Config key '{key}' is {value!r}; {what}.")

  from jaxcls.models import BACKBONES  # pylint: disable=import-outside-toplevel
  need(c.model.name in BACKBONES, "model.name", f"choose one of {sorted(BACKBONES)}")
  need(bool(c.data.source), "data.source",
       "set it, e.g. --config.data.source=folder:/path/to/PetImages")
  need(c.batch_size > 0, "batch_size", "it must be a positive integer")
  need(c.num_epochs > 0, "num_epochs", "it must be a positive integer")
  need(8 <= c.data.image_size <= 4096, "data.image_size", "use 8 to 4096 pixels")
  need(0.0 < c.data.val_fraction < 1.0, "data.val_fraction", "use a fraction in (0, 1)")
  need(c.data.workers >= 0, "data.workers", "use 0 (one per core) or a positive count")
  need(c.data.cache in ("none", "memory", "disk"), "data.cache",
       "use 'none', 'memory' or 'disk'")
  if c.data.source.startswith("tfds:"):
    need(bool(c.data.train_split), "data.train_split", "name a TFDS split, e.g. train[:80%]")
    need(bool(c.data.val_split), "data.val_split", "name a TFDS split, e.g. train[80%:]")
  need(len(c.augment.scale) == 2 and 0 < c.augment.scale[0] <= c.augment.scale[1],
       "augment.scale", "give (min_zoom, max_zoom) with 0 < min <= max")
  need(0.0 <= c.augment.rotation <= 180.0, "augment.rotation", "use 0 to 180 degrees")
  _check_recipe_values(c, need)
  need(0.0 <= c.model.dropout < 1.0, "model.dropout", "use a rate in [0, 1)")
  need(c.model.dtype != "float16", "model.dtype",
       "float16 needs loss scaling, which jaxcls does not do (small gradients would "
       "underflow to zero); use 'bfloat16' (float32's range, the same speed) or 'auto'")
  need(c.model.dtype in ("auto", "float32", "bfloat16"), "model.dtype",
       "use 'auto' (bfloat16 on GPUs and TPUs, float32 on CPUs), 'float32' or 'bfloat16'")
  need(len(c.model.input_mean) == 3 and len(c.model.input_std) == 3
       and all(s > 0 for s in c.model.input_std), "model.input_std",
       "give three positive numbers (and three means)")
  need(c.optim.learning_rate > 0, "optim.learning_rate", "it must be positive")
  need(0.0 <= c.optim.momentum < 1.0, "optim.momentum", "use [0, 1)")
  need(c.optim.weight_decay >= 0, "optim.weight_decay", "it must be >= 0")
  need(c.optim.l1 >= 0, "optim.l1", "it must be >= 0")
  need(c.optim.schedule in ("constant", "cosine", "step"), "optim.schedule",
       "use 'constant', 'cosine' or 'step'")
  need(c.optim.warmup_epochs >= 0, "optim.warmup_epochs", "it must be >= 0")
  _check_transfer_values(c, need)
  need(c.checkpoint.keep >= 1, "checkpoint.keep", "keep at least 1")
  need(c.train.log_every_steps >= 1, "train.log_every_steps", "use 1 or more")
  need(c.train.log_images >= 0, "train.log_images", "use 0 (none) or a positive count")
  need(c.checkpoint.every_steps >= 0, "checkpoint.every_steps",
       "use 0 (epoch ends only) or a positive number of steps")
  need(c.train.early_stopping_patience >= 0, "train.early_stopping_patience",
       "use 0 (off) or a positive number of epochs")


def _check_transfer_values(c: ml_collections.ConfigDict, need) -> None:
  """Range checks for the head, recipe and transfer-learning keys."""
  need(all(isinstance(w, int) and w > 0 for w in c.model.head_hidden),
       "model.head_hidden", "give positive integer widths, e.g. (256,), or () for none")
  need(all(isinstance(n, str) for n in c.optim.decay_leaves), "optim.decay_leaves",
       "give parameter names, e.g. ('kernel',) or ('kernel', 'bias', 'scale')")
  need(all(e > 0 for e in c.optim.step_epochs)
       and list(c.optim.step_epochs) == sorted(c.optim.step_epochs),
       "optim.step_epochs", "give increasing positive epochs, e.g. (30, 60)")
  need(c.optim.schedule != "step" or len(c.optim.step_epochs) > 0, "optim.step_epochs",
       "set the epochs at which the 'step' schedule decays, e.g. (30, 60)")
  need(0.0 < c.optim.step_factor <= 1.0, "optim.step_factor", "use a factor in (0, 1]")
  need(c.optim.grad_clip_norm >= 0, "optim.grad_clip_norm", "use 0 (off) or a positive norm")
  need(c.optim.freeze in ("none", "backbone"), "optim.freeze", "use 'none' or 'backbone'")
  need(c.optim.backbone_lr_mult >= 0, "optim.backbone_lr_mult", "it must be >= 0")
  need(0.0 <= c.train.label_smoothing < 1.0, "train.label_smoothing", "use [0, 1)")
  need(c.train.unfreeze_after_epochs >= 0, "train.unfreeze_after_epochs",
       "use 0 (stay frozen) or a positive number of epochs")
  need(c.train.unfreeze_after_epochs == 0 or c.optim.freeze == "backbone",
       "train.unfreeze_after_epochs",
       "it only applies with optim.freeze='backbone'; set that or use 0")


def _check_recipe_values(c: ml_collections.ConfigDict, need) -> None:
  """Range checks for the optimizer choice, EMA, accumulation and augmentation policy."""
  area, ratio = c.augment.crop_area, c.augment.crop_ratio
  need(len(area) == 2 and 0 < area[0] <= area[1] <= 1, "augment.crop_area",
       "give (min, max) shares of the area with 0 < min <= max <= 1")
  need(len(ratio) == 2 and 0 < ratio[0] <= ratio[1], "augment.crop_ratio",
       "give (min, max) aspect ratios with 0 < min <= max, e.g. (0.75, 1.333)")
  need(c.augment.policy in ("none", "randaugment", "trivialaugment"), "augment.policy",
       "use 'none', 'randaugment' or 'trivialaugment'")
  need(c.augment.policy_ops >= 1, "augment.policy_ops", "use 1 or more")
  need(0 <= c.augment.policy_magnitude <= 30, "augment.policy_magnitude", "use 0 to 30")
  need(c.augment.mixup_alpha >= 0, "augment.mixup_alpha", "use 0 (off) or more")
  need(c.augment.cutmix_alpha >= 0, "augment.cutmix_alpha", "use 0 (off) or more")
  need(c.optim.name in ("sgd", "adamw"), "optim.name", "use 'sgd' or 'adamw'")
  need(0 <= c.optim.beta1 < 1 and 0 <= c.optim.beta2 < 1, "optim.beta1",
       "use betas in [0, 1)")
  need(c.optim.eps > 0, "optim.eps", "it must be positive")
  need(0 <= c.optim.ema_decay < 1, "optim.ema_decay", "use 0 (off) or a decay in (0, 1)")
  need(c.train.accumulate_steps >= 1, "train.accumulate_steps", "use 1 or more")
  need(not c.model.name.startswith("resnet9") or len(c.model.widths) == 4, "model.widths",
       f"{c.model.name} takes 4 widths (stem, stage 1, 2, 3), e.g. (32, 64, 128, 256)")
  need(all(isinstance(s, int) and 8 <= s <= c.data.image_size
           for s in c.train.progressive_sizes), "train.progressive_sizes",
       "give whole pixel sizes from 8 to data.image_size, e.g. (64, 96, 128)")
  need(all(w > 0 for w in c.train.class_weights), "train.class_weights",
       "give one positive weight per class, or () for none")
  need(not (c.train.balance_classes and c.train.class_weights), "train.balance_classes",
       "use either train.balance_classes or train.class_weights, not both")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """Rebuilds a config saved with a checkpoint (JSON turns tuples into lists)."""
  config = base_config()

  def merge(target: ml_collections.ConfigDict, source: dict, prefix: str):
    for key, value in source.items():
      if key not in target:
        raise ConfigError(f"Saved config has unknown key '{prefix}{key}'.")
      if isinstance(value, dict):
        merge(target[key], value, f"{prefix}{key}.")
      else:
        default = target[key]
        target[key] = tuple(value) if isinstance(default, tuple) else value

  merge(config, values, "")
  return config


RECIPE_MODULE_PREFIX = "jaxcls_recipe_"  # + the file's stem: how a recipe is imported.


def import_recipe(path: str) -> ModuleType:
  """Runs the recipe (or any Python file) at `path` as the module jaxcls_recipe_STEM.

  Whatever it registers (backbones, data sources) is registered from then on; the
  module is kept in sys.modules so that its functions' `__module__` names it, which is
  how a workdir records the file that registered its backbone (jaxcls.workdir).
  """
  path = os.path.abspath(os.path.expanduser(path))
  name = RECIPE_MODULE_PREFIX + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # Registries (models, sources) may refer back to it.
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop(name, None)
    raise
  return module
