"""`torchvision:` sources: torch hub's checkpoint folder, offline use, broken downloads.

download.pytorch.org is a local server (weight_servers.FileServer) reached through
JAXCLS_TORCHVISION_URL; torch hub's folder is a temporary TORCH_HOME. torchvision's real
files cannot be made here (their names carry their SHA-256 prefix), so each test
registers a release named like torchvision's after the SHA-256 of the bytes it serves.
These tests fetch files only (no model is built): the unit lane.
"""

import hashlib
import os
import re
import sys

import pytest

from jaxcls.cli import pretrained as pretrained_cli
from jaxcls.pretrained import DownloadError, WeightsError, imagenet_class_names, torch_hub
from weight_servers import FileServer

pytest.importorskip("torch")

DATA = b"a torchvision release file" * 1000
FILE = f"resnet18-{hashlib.sha256(DATA).hexdigest()[:8]}.pth"


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
  """TORCH_HOME in tmp_path, and a release `torchvision:resnet18.TEST` named as
  torchvision names its files; returns the checkpoint folder."""
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.setitem(torch_hub.RELEASES, ("resnet18", "TEST"), FILE)
  return str(tmp_path / "torch" / "hub" / "checkpoints")


def test_download_lands_in_torch_hubs_folder_and_is_reused_without_network(
    torch_home, monkeypatch):
  with FileServer({FILE: DATA}) as server:
    monkeypatch.setenv(torch_hub.URL_ENV, server.url)
    release = torch_hub.fetch("resnet18.TEST")
    assert server.requests == [("GET", "/" + FILE)]
  assert release.path == os.path.join(torch_home, FILE)
  assert os.listdir(torch_home) == [FILE]  # No temporary file left beside it.
  with open(release.path, "rb") as f:
    assert f.read() == DATA
  assert release.arch == "resnet18" and release.origin == "torchvision:resnet18.TEST"
  assert release.class_names == imagenet_class_names() and release.image_size == 224
  # The server is gone: the cached file is used as it is.
  assert torch_hub.fetch("resnet18.TEST").path == release.path


def test_prepared_folder_is_used_offline(torch_home, monkeypatch):
  os.makedirs(torch_home)
  with open(os.path.join(torch_home, FILE), "wb") as f:
    f.write(DATA)
  monkeypatch.setenv(torch_hub.URL_ENV, "http://127.0.0.1:9")  # Nothing listens there.
  assert torch_hub.fetch("resnet18.TEST").path == os.path.join(torch_home, FILE)


def test_unreachable_and_uncached_is_one_error_naming_the_folder_and_the_alternative(
    torch_home, monkeypatch, capsys):
  monkeypatch.setenv(torch_hub.URL_ENV, "http://127.0.0.1:9/models/")
  with pytest.raises(DownloadError) as raised:
    torch_hub.fetch("resnet18.TEST")
  before, reason, after = re.fullmatch(r"(.*now \()(.*)(\)\. Where.*)",
                                       str(raised.value)).groups()
  assert before == (f"torchvision:resnet18.TEST: {FILE} is not in torch hub's cache "
                    f"({torch_home}) and http://127.0.0.1:9/models/{FILE} cannot be "
                    "downloaded now (")
  assert "Connection refused" in reason  # The system's words, after its error number.
  assert after == ("). Where there is network the same command fills that cache "
                   "(TORCH_HOME moves it); offline, put the file there, or import it: "
                   f"jaxcls-pretrained import --arch resnet18 --weights {FILE} --out DIR.")
  out = os.path.join(os.path.dirname(torch_home), "out")
  code = pretrained_cli.main(["import", "--weights", "torchvision:resnet18.TEST", "--out",
                              out])
  err = capsys.readouterr().err
  assert code == 2 and [line for line in err.splitlines() if "error" in line.lower()] == [
      f"error: {raised.value}"] and "Traceback" not in err
  assert not os.path.exists(out)


@pytest.mark.parametrize("served, cut", [(DATA[:-1] + b"!", ()), (DATA, (FILE,))],
                         ids=["altered", "cut-short"])
def test_corrupt_or_truncated_download_keeps_nothing(torch_home, monkeypatch, served, cut):
  with FileServer({FILE: served}, cut=cut) as server:
    monkeypatch.setenv(torch_hub.URL_ENV, server.url)
    with pytest.raises(WeightsError) as raised:
      torch_hub.fetch("resnet18.TEST")
  prefix = FILE[len("resnet18-"):-len(".pth")]
  assert str(raised.value).startswith(
      f"torchvision:resnet18.TEST: the download of {server.url}/{FILE} is corrupt or "
      f'truncated (invalid hash value (expected "{prefix}", got "')
  assert str(raised.value).endswith(f"); nothing was kept in {torch_home}. Run the "
                                    "command again to retry.")
  assert os.listdir(torch_home) == []  # Neither the file nor its .partial.


def test_corrupt_cached_file_is_removed_and_named(torch_home):
  os.makedirs(torch_home)
  path = os.path.join(torch_home, FILE)
  with open(path, "wb") as f:
    f.write(DATA[:100])
  got = hashlib.sha256(DATA[:100]).hexdigest()[:8]
  with pytest.raises(WeightsError) as raised:
    torch_hub.fetch("resnet18.TEST")
  assert str(raised.value) == (
      f"torchvision:resnet18.TEST: the cached {path} is corrupt (its SHA-256 begins {got}, "
      f"torchvision publishes {FILE[9:17]}). Removed it; run the command again to "
      "download it afresh.")
  assert not os.path.exists(path)


def test_names_resolve_to_torchvisions_files():
  assert torch_hub.release_file("resnet50") == ("resnet50", "resnet50-11ad3fa6.pth")
  assert torch_hub.release_file("resnet50.IMAGENET1K_V1") == ("resnet50",
                                                              "resnet50-0676ba61.pth")
  assert torch_hub.release_file("resnet18") == ("resnet18", "resnet18-f37072fd.pth")
  with pytest.raises(WeightsError, match=r"^'torchvision:resnet101' is not a torchvision "
                     r"release jaxcls converts; choose torchvision:ARCH \(torchvision's "
                     r"default weights\) for ARCH in \['resnet18', 'resnet34', 'resnet50'\]"):
    torch_hub.release_file("resnet101")


def test_without_torch_the_error_says_what_to_install(torch_home, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  monkeypatch.setitem(sys.modules, "torch.hub", None)
  with pytest.raises(WeightsError, match=r"^torchvision:resnet18.TEST is a PyTorch .pth "
                     r"file, and reading it needs PyTorch: pip install 'jaxcls\[torch\]' "
                     r"\(a CPU build is enough\). Without torch, take timm's copy"):
    torch_hub.fetch("resnet18.TEST")
