"""`torchvision:ARCH[.WEIGHTS]`: torchvision's release files, through torch hub's cache.

`torchvision:resnet50` is torchvision's default weights for that architecture
(`ResNet50_Weights.DEFAULT`, i.e. IMAGENET1K_V2); `torchvision:resnet50.IMAGENET1K_V1`
picks another. The file (`resnet50-11ad3fa6.pth`) lives where torchvision keeps it,
torch hub's checkpoint folder `$TORCH_HOME/hub/checkpoints/` (default
`~/.cache/torch/hub/checkpoints/`): a file already there is used without network access,
else it is downloaded there with `torch.hub.download_url_to_file`, which writes a
temporary `.partial` file, checks the SHA-256 prefix that the file's name publishes
(`11ad3fa6`) and only then renames it. A cached file is checked against the same prefix
before use; one that fails is removed and named.

`JAXCLS_TORCHVISION_URL` replaces the download address
(https://download.pytorch.org/models), for a mirror. Reading a .pth file needs PyTorch.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os

from jaxcls.pretrained.weights import (DownloadError, Release, WeightsError,
                                       imagenet_class_names)

SCHEME = "torchvision:"
URL_ENV = "JAXCLS_TORCHVISION_URL"
DEFAULT_URL = "https://download.pytorch.org/models"

# torchvision's release files (torchvision/models/resnet.py), by architecture and
# weights name, for the architectures jaxcls has.
RELEASES = {
    ("resnet18", "IMAGENET1K_V1"): "resnet18-f37072fd.pth",
    ("resnet34", "IMAGENET1K_V1"): "resnet34-b627a593.pth",
    ("resnet50", "IMAGENET1K_V1"): "resnet50-0676ba61.pth",
    ("resnet50", "IMAGENET1K_V2"): "resnet50-11ad3fa6.pth",
}
DEFAULTS = {"resnet18": "IMAGENET1K_V1", "resnet34": "IMAGENET1K_V1",
            "resnet50": "IMAGENET1K_V2"}  # torchvision's `Weights.DEFAULT`.

log = logging.getLogger("jaxcls")


def release_file(name: str) -> tuple[str, str]:
  """("resnet50", "resnet50-11ad3fa6.pth") for `name` = "resnet50[.WEIGHTS]"."""
  arch, _, weights = name.partition(".")
  filename = RELEASES.get((arch, weights or DEFAULTS.get(arch)))
  if filename is None:
    known = ", ".join(f"{SCHEME}{a}.{w}" for a, w in RELEASES)
    raise WeightsError(f"'{SCHEME}{name}' is not a torchvision release jaxcls converts; "
                       f"choose {SCHEME}ARCH (torchvision's default weights) for ARCH in "
                       f"{sorted(DEFAULTS)}, or one of {known}.")
  return arch, filename


def _torch(spec: str):
  try:
    import torch.hub
  except ModuleNotFoundError:
    raise WeightsError(
        f"{spec} is a PyTorch .pth file, and reading it needs PyTorch: pip install "
        "'jaxcls[torch]' (a CPU build is enough). Without torch, take timm's copy of the "
        "weights from the hub as safetensors, e.g. hf-hub:timm/resnet50.tv2_in1k.") from None
  return torch


def fetch(name: str) -> Release:
  """`name` is what follows `torchvision:`."""
  spec = SCHEME + name
  arch, filename = release_file(name)
  torch = _torch(spec)
  folder = os.path.join(torch.hub.get_dir(), "checkpoints")
  path = os.path.join(folder, filename)
  prefix = torch.hub.HASH_REGEX.search(filename).group(1)
  if os.path.exists(path):
    _check_cached(spec, path, prefix)
    log.info("%s: %s from torch hub's cache.", spec, path)
  else:
    _download(spec, arch, filename, folder, prefix, torch)
  return Release(arch=arch, path=path, origin=spec, class_names=imagenet_class_names())


def _check_cached(spec: str, path: str, prefix: str) -> None:
  with open(path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  if not digest.startswith(prefix):
    os.remove(path)
    raise WeightsError(f"{spec}: the cached {path} is corrupt (its SHA-256 begins "
                       f"{digest[:8]}, torchvision publishes {prefix}). Removed it; run "
                       "the command again to download it afresh.")


def _download(spec: str, arch: str, filename: str, folder: str, prefix: str,
              torch) -> None:
  url = os.environ.get(URL_ENV, DEFAULT_URL).rstrip("/") + "/" + filename
  os.makedirs(folder, exist_ok=True)
  log.info("%s: downloading %s into %s", spec, url, folder)
  try:
    torch.hub.download_url_to_file(url, os.path.join(folder, filename), hash_prefix=prefix)
  except RuntimeError as e:  # torch's "invalid hash value": the partial file is gone.
    raise WeightsError(f"{spec}: the download of {url} is corrupt or truncated ({e}); "
                       f"nothing was kept in {folder}. Run the command again to retry.") from None
  except (OSError, http.client.HTTPException) as e:  # No network, HTTP errors, a cut.
    reason = " ".join(str(getattr(e, "reason", None) or e or type(e).__name__).split())
    raise DownloadError(
        f"{spec}: {filename} is not in torch hub's cache ({folder}) and {url} cannot be "
        f"downloaded now ({reason}). Where there is network the same command fills that "
        f"cache (TORCH_HOME moves it); offline, put the file there, or import it: "
        f"jaxcls-pretrained import --arch {arch} --weights {filename} --out DIR.") from None
