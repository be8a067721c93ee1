"""`hf-hub:REPO[@REVISION]`: timm weights on the Hugging Face hub, through its own cache.

A timm repository (`timm/resnet50.tv2_in1k`, `timm/convnext_tiny.fb_in1k`, ...) holds
`model.safetensors` (the state dict) and `config.json` (`architecture`, and under
`pretrained_cfg` the input `mean`/`std` in 0..1 units, `input_size`, `test_input_size`).
Both are fetched with `huggingface_hub.hf_hub_download`, so they land in, and are read
from, the hub's own cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`), the one
timm and transformers use: nothing is fetched twice. A file already cached is used
without any request (not even the check for a newer revision); `HF_HUB_OFFLINE=1` makes
a missing one an error at once, and `HF_ENDPOINT` points at a mirror.

huggingface_hub downloads to a `.incomplete` name and renames when the size is right.
On top of that the weights are checked here before use: the safetensors header must
describe the file exactly, and the file's SHA-256 must be the hub's (a weights file's
cache name is its SHA-256). A file that fails is removed from the cache and named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

from jaxcls.pretrained.names import LAYOUTS
from jaxcls.pretrained.weights import (DownloadError, Release, WeightsError,
                                       imagenet_class_names)

SCHEME = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

log = logging.getLogger("jaxcls")


def fetch(repo: str) -> Release:
  """`repo` is what follows `hf-hub:`: `timm/resnet50.tv2_in1k`, optionally `@REVISION`."""
  repo_id, _, revision = repo.partition("@")
  spec = SCHEME + repo
  config_path = _cached_or_downloaded(spec, repo_id, revision or None, CONFIG_FILE)
  weights_path = _cached_or_downloaded(spec, repo_id, revision or None, WEIGHTS_FILE)
  _check_weights(spec, weights_path)
  return _release(spec, _read_config(spec, config_path), weights_path)


def cache_folder(repo_id: str) -> str:
  """Where huggingface_hub keeps `repo_id`'s files."""
  from huggingface_hub import constants
  from huggingface_hub.file_download import repo_folder_name
  return os.path.join(constants.HF_HUB_CACHE,
                      repo_folder_name(repo_id=repo_id, repo_type="model"))


def _cached_or_downloaded(spec: str, repo_id: str, revision: str | None,
                          filename: str) -> str:
  from huggingface_hub import hf_hub_download
  from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
  try:
    path = hf_hub_download(repo_id, filename, revision=revision, local_files_only=True)
    log.info("%s: %s from the cache (%s).", spec, filename, path)
    return path
  except LocalEntryNotFoundError:
    pass
  except HFValidationError as e:
    raise WeightsError(f"'{spec}' is not a hub repository name ({_one_line(e)}); timm's "
                       "look like hf-hub:timm/resnet50.tv2_in1k.") from None
  from huggingface_hub import constants
  if constants.HF_HUB_OFFLINE:  # What hf_hub_download would say, without the request.
    raise _download_error(spec, repo_id, revision, filename,
                          LocalEntryNotFoundError("HF_HUB_OFFLINE is set"))
  log.info("%s: %s is not in the cache; downloading it from %s into %s (a failed "
           "connection is retried 5 times)", spec, filename, constants.ENDPOINT,
           cache_folder(repo_id))
  try:
    return hf_hub_download(repo_id, filename, revision=revision)
  except OSError as e:  # Every error huggingface_hub raises for a download.
    raise _download_error(spec, repo_id, revision, filename, e) from None


def _download_error(spec: str, repo_id: str, revision: str | None, filename: str,
                    error: OSError) -> WeightsError:
  """The one-line error for a failed `hf_hub_download`."""
  from huggingface_hub import constants, errors
  if isinstance(error, errors.RepositoryNotFoundError):
    return WeightsError(f"{spec}: {constants.ENDPOINT} has no model repository "
                        f"'{repo_id}' (or it is private or gated). timm's are named like "
                        "hf-hub:timm/resnet50.tv2_in1k.")
  if isinstance(error, errors.RevisionNotFoundError):
    return WeightsError(f"{spec}: '{repo_id}' has no revision '{revision}'.")
  if isinstance(error, errors.RemoteEntryNotFoundError):
    return WeightsError(f"{spec}: the repository has no {filename}; jaxcls reads timm's "
                        f"{WEIGHTS_FILE} and {CONFIG_FILE}.")
  if isinstance(error, errors.LocalEntryNotFoundError):
    reason = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
              else f"{constants.ENDPOINT} cannot be reached")
    arch = repo_id.rpartition("/")[2].partition(".")[0]
    return DownloadError(
        f"{spec}: {filename} is not in the Hugging Face cache ({cache_folder(repo_id)}) "
        f"and cannot be downloaded now ({reason}). Where there is network the same "
        "command fills that cache (HF_HOME moves it); offline, import a copy of the "
        f"file: jaxcls-pretrained import --arch {arch if arch in LAYOUTS else 'ARCH'} "
        f"--weights {WEIGHTS_FILE} --out DIR.")
  # Another HTTP error, or a download of the wrong size.
  return DownloadError(f"{spec}: downloading {filename} failed ({_one_line(error)}). "
                       "Run the command again to retry.")


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


def _discard(path: str) -> None:
  """Removes a cached file: the snapshot's link and the blob it points to."""
  blob = os.path.realpath(path)
  for name in {path, blob}:
    if os.path.lexists(name):
      os.remove(name)


def _problem(path: str) -> str | None:
  """What is wrong with a cached safetensors file, or None."""
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(path, framework="np"):
      pass
  except (SafetensorError, OSError) as e:
    return f"is not a readable safetensors file ({_one_line(e)})"
  expected = os.path.basename(os.path.realpath(path))
  if re.fullmatch(r"[0-9a-f]{64}", expected):  # The hub names weights by their SHA-256.
    with open(path, "rb") as f:
      digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != expected:
      return f"has SHA-256 {digest[:12]}…, not the hub's {expected[:12]}…"
  return None


def _check_weights(spec: str, path: str) -> None:
  problem = _problem(path)
  if problem:
    blob = os.path.realpath(path)
    _discard(path)
    raise WeightsError(f"{spec}: the downloaded {WEIGHTS_FILE} ({blob}) {problem}: a "
                       "corrupt or truncated download. Removed it from the cache; run the "
                       "command again to download it afresh.")


def _read_config(spec: str, path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    if not isinstance(config, dict):
      raise ValueError("not a JSON object")
  except (ValueError, UnicodeDecodeError) as e:
    _discard(path)
    raise WeightsError(f"{spec}: the downloaded {CONFIG_FILE} is not timm's JSON ({e}). "
                       "Removed it from the cache; run the command again.") from None
  return config


def _release(spec: str, config: dict, weights_path: str) -> Release:
  """What timm's config.json says: the architecture, normalization, size and classes."""
  arch = config.get("architecture")
  if arch is None:
    raise WeightsError(f"{spec}: its {CONFIG_FILE} names no timm architecture; jaxcls "
                       "reads timm's repositories, e.g. hf-hub:timm/resnet50.tv2_in1k.")
  if arch not in LAYOUTS:
    raise WeightsError(f"{spec} holds timm's '{arch}'; jaxcls converts {sorted(LAYOUTS)}.")
  pretrained = config.get("pretrained_cfg") or config  # Older files have one level.
  mean = tuple(255 * float(m) for m in pretrained.get("mean", (0.485, 0.456, 0.406)))
  std = tuple(255 * float(s) for s in pretrained.get("std", (0.229, 0.224, 0.225)))
  size = pretrained.get("test_input_size") or pretrained.get("input_size") or (3, 224, 224)
  return Release(arch=arch, path=weights_path, origin=spec, mean=mean, std=std,
                 class_names=_class_names(config, pretrained), image_size=int(size[-1]))


def _class_names(config: dict, pretrained: dict) -> tuple[str, ...] | None:
  """timm's label descriptions, else ImageNet's names for 1000 classes, else its labels."""
  labels = config.get("label_names") or pretrained.get("label_names")
  descriptions = config.get("label_descriptions") or pretrained.get("label_descriptions")
  if isinstance(labels, list) and isinstance(descriptions, dict):
    return tuple(str(descriptions.get(label, label)) for label in labels)
  if (config.get("num_classes") or pretrained.get("num_classes")) == 1000:
    return imagenet_class_names()
  return tuple(str(label) for label in labels) if isinstance(labels, list) else None
