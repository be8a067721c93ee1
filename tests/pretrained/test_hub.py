"""`hf-hub:` sources: the Hugging Face cache, offline use, and broken downloads.

The hub is a local server (weight_servers.HubServer) speaking what hf_hub_download asks
for; its cache is a temporary HF_HOME. These tests fetch files only (no model is built),
so they run in the unit lane; test_published.py converts and compares logits.
"""

import hashlib
import io
import json
import logging
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxcls.cli import pretrained as pretrained_cli
from jaxcls.pretrained import DownloadError, WeightsError, hub, imagenet_class_names
from weight_servers import COMMIT, HubServer, hub_environment

REPO = "timm/resnet18.test"
CONFIG = {"architecture": "resnet18", "num_classes": 1000, "num_features": 512,
          "pretrained_cfg": {"mean": [0.5, 0.25, 0.125], "std": [0.5, 0.5, 0.25],
                             "input_size": [3, 176, 176],
                             "test_input_size": [3, 224, 224]}}


def weights_bytes(tmp_path) -> bytes:
  path = str(tmp_path / "w.safetensors")
  save_file({"fc.weight": np.arange(12, dtype=np.float32).reshape(4, 3),
             "fc.bias": np.ones(4, np.float32)}, path)
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture
def repo_files(tmp_path):
  return {REPO: {"config.json": json.dumps(CONFIG).encode(),
                 "model.safetensors": weights_bytes(tmp_path)}}


def snapshot(cache: str, name: str) -> str:
  return os.path.join(cache, "models--timm--resnet18.test", "snapshots", COMMIT, name)


def test_download_fills_the_hub_cache_and_a_cached_file_needs_no_request(tmp_path,
                                                                         repo_files):
  with HubServer(repo_files) as server, hub_environment(str(tmp_path / "hf"),
                                                        server.url) as cache:
    release = hub.fetch(REPO)
    assert server.gets() == 2  # config.json and model.safetensors, once each.
    again = hub.fetch(REPO)
    assert len(server.requests) == 4  # A HEAD and a GET each, the first time only.
  assert release.path == again.path == snapshot(cache, "model.safetensors")
  blob = os.path.realpath(release.path)
  assert os.path.basename(blob) == hashlib.sha256(
      repo_files[REPO]["model.safetensors"]).hexdigest()
  assert release.arch == "resnet18" and release.origin == "hf-hub:" + REPO
  assert release.mean == (127.5, 63.75, 31.875) and release.std == (127.5, 127.5, 63.75)
  assert release.image_size == 224  # timm's test_input_size: the evaluation size.
  assert release.class_names == imagenet_class_names()
  assert release.class_names[:3] == ("tench", "goldfish", "great white shark")
  assert len(set(release.class_names)) == 1000


def write_cache(cache: str, files: dict) -> None:
  """The hub cache's layout, by hand: blobs named by their ETag, a snapshot of links to
  them, and refs/main naming the snapshot's commit."""
  folder = os.path.join(cache, "models--timm--resnet18.test")
  os.makedirs(os.path.join(folder, "blobs"))
  os.makedirs(os.path.join(folder, "refs"))
  os.makedirs(os.path.join(folder, "snapshots", COMMIT))
  with open(os.path.join(folder, "refs", "main"), "w") as f:
    f.write(COMMIT)
  for name, data in files.items():
    etag = hashlib.sha256(data).hexdigest()
    with open(os.path.join(folder, "blobs", etag), "wb") as f:
      f.write(data)
    os.symlink(os.path.join("..", "..", "blobs", etag),
               os.path.join(folder, "snapshots", COMMIT, name))


def test_prepared_cache_is_used_offline(tmp_path, repo_files):
  with hub_environment(str(tmp_path / "hf"), offline=True) as cache:
    write_cache(cache, repo_files[REPO])
    release = hub.fetch(REPO)
  assert release.path == snapshot(cache, "model.safetensors")
  assert release.arch == "resnet18" and release.image_size == 224


def test_offline_without_the_file_is_one_error_naming_the_cache_and_the_alternative(
    tmp_path, capsys):
  with hub_environment(str(tmp_path / "hf"), offline=True) as cache:
    with pytest.raises(DownloadError) as raised:
      hub.fetch(REPO)
  message = str(raised.value)
  assert message == (
      f"hf-hub:{REPO}: config.json is not in the Hugging Face cache "
      f"({cache}/models--timm--resnet18.test) and cannot be downloaded now "
      "(HF_HUB_OFFLINE is set). Where there is network the same command fills that cache "
      "(HF_HOME moves it); offline, import a copy of the file: jaxcls-pretrained import "
      "--arch resnet18 --weights model.safetensors --out DIR.")

  # The program says it in one error line, with no traceback, and writes nothing.
  out = str(tmp_path / "out")
  with hub_environment(str(tmp_path / "hf"), offline=True):
    code = pretrained_cli.main(["import", "--weights", "hf-hub:" + REPO, "--out", out])
  err = capsys.readouterr().err
  assert code == 2 and err.strip().splitlines() == ["error: " + message], err
  assert not os.path.exists(out)


def test_altered_download_is_detected_removed_and_named(tmp_path, repo_files):
  good = repo_files[REPO]["model.safetensors"]
  altered = good[:-4] + bytes(4)  # Same size, same header, other tensor values.
  with HubServer(repo_files, {(REPO, "model.safetensors"): altered}) as bad, \
      hub_environment(str(tmp_path / "hf"), bad.url) as cache:
    with pytest.raises(WeightsError) as raised:
      hub.fetch(REPO)
  blob = os.path.join(cache, "models--timm--resnet18.test", "blobs",
                      hashlib.sha256(good).hexdigest())
  sha_altered = hashlib.sha256(altered).hexdigest()
  assert str(raised.value) == (
      f"hf-hub:{REPO}: the downloaded model.safetensors ({blob}) has SHA-256 "
      f"{sha_altered[:12]}…, not the hub's {os.path.basename(blob)[:12]}…: a corrupt or "
      "truncated download. Removed it from the cache; run the command again to download "
      "it afresh.")
  assert not os.path.lexists(blob)
  assert not os.path.lexists(snapshot(cache, "model.safetensors"))
  with HubServer(repo_files) as server, hub_environment(str(tmp_path / "hf"), server.url):
    assert os.path.realpath(hub.fetch(REPO).path) == blob
    assert server.gets() == 1  # Only the weights again: config.json was good.


def test_truncated_cached_file_is_detected_by_its_header_and_removed(tmp_path, repo_files):
  with HubServer(repo_files) as server, hub_environment(str(tmp_path / "hf"), server.url):
    path = hub.fetch(REPO).path
    blob = os.path.realpath(path)
    with open(blob, "r+b") as f:  # The disk lost the file's end.
      f.truncate(os.path.getsize(blob) - 10)
    with pytest.raises(WeightsError, match=r"is not a readable safetensors file \(Error "
                       r"while deserializing header: incomplete metadata, file not fully "
                       r"covered\): a corrupt or truncated download. Removed it"):
      hub.fetch(REPO)
    assert not os.path.lexists(blob) and not os.path.lexists(path)
    assert hub.fetch(REPO).path == path  # Downloaded afresh.
    with open(blob, "rb") as f:
      assert f.read() == repo_files[REPO]["model.safetensors"]


def test_download_shorter_than_the_hubs_size_keeps_no_file_under_the_weights_name(tmp_path, repo_files):
  size = len(repo_files[REPO]["model.safetensors"])
  short = repo_files[REPO]["model.safetensors"][:size // 2]
  with HubServer(repo_files, {(REPO, "model.safetensors"): short}) as bad, \
      hub_environment(str(tmp_path / "hf"), bad.url) as cache:
    with pytest.raises(DownloadError, match=rf"^hf-hub:{REPO}: downloading "
                       rf"model.safetensors failed \(Consistency check failed: file should "
                       rf"be of size {size} but has size {size // 2}"):
      hub.fetch(REPO)
  assert not os.path.lexists(snapshot(cache, "model.safetensors"))
  blobs = os.listdir(os.path.join(cache, "models--timm--resnet18.test", "blobs"))
  assert all(name.endswith(".incomplete") or name == hashlib.sha1(
      b"blob %d\0" % len(repo_files[REPO]["config.json"])
      + repo_files[REPO]["config.json"]).hexdigest() for name in blobs), blobs


def test_missing_repository_file_and_architecture_are_named(tmp_path, repo_files):
  vit = {"architecture": "vit_base_patch16_224", "num_classes": 1000}
  files = {**repo_files, "timm/nothing": {"config.json": b"{}"},
           "bert/base": {"config.json": b'{"model_type": "bert"}',
                         "model.safetensors": repo_files[REPO]["model.safetensors"]},
           "timm/vit": {"config.json": json.dumps(vit).encode(),
                        "model.safetensors": repo_files[REPO]["model.safetensors"]}}
  with HubServer(files) as server, hub_environment(str(tmp_path / "hf"), server.url):
    with pytest.raises(WeightsError, match=rf"^hf-hub:timm/nope: {server.url} has no "
                       "model repository 'timm/nope' \\(or it is private or gated\\)"):
      hub.fetch("timm/nope")
    with pytest.raises(WeightsError, match="^hf-hub:timm/nothing: the repository has no "
                       "model.safetensors; jaxcls reads timm's model.safetensors and "
                       "config.json.$"):
      hub.fetch("timm/nothing")
    with pytest.raises(WeightsError, match="^hf-hub:bert/base: its config.json names no "
                       "timm architecture; jaxcls reads timm's repositories"):
      hub.fetch("bert/base")
    with pytest.raises(WeightsError, match=r"^hf-hub:timm/vit holds timm's "
                       r"'vit_base_patch16_224'; jaxcls converts \['convnext_base', "):
      hub.fetch("timm/vit")
    with pytest.raises(WeightsError, match=f"^hf-hub:{REPO}@v2: '{REPO}' has no "
                       "revision 'v2'.$"):
      hub.fetch(REPO + "@v2")
    assert hub.fetch(f"{REPO}@{COMMIT}").arch == "resnet18"


def test_a_name_the_hub_cannot_have_is_refused_before_any_request(tmp_path):
  with hub_environment(str(tmp_path / "hf"), "http://127.0.0.1:9"):
    with pytest.raises(WeightsError) as raised:
      hub.fetch("timm/bad name")
  assert str(raised.value) == (
      "'hf-hub:timm/bad name' is not a hub repository name (Repo id must use alphanumeric "
      "chars, '-', '_' or '.'. The name cannot start or end with '-' or '.' and the "
      "maximum length is 96: 'timm/bad name'.); timm's look like "
      "hf-hub:timm/resnet50.tv2_in1k.")


def test_programs_print_no_huggingface_hub_retry_warnings():
  """huggingface_hub's own handler plus propagation printed each retry warning twice."""
  from huggingface_hub.utils import logging as hf_logging
  from jaxcls.cli import common
  hub_logger = hf_logging.get_logger("huggingface_hub")  # Has hub's own handler.
  hubs_own = [h for h in hub_logger.handlers if type(h) is logging.StreamHandler]
  saved = hub_logger.level, hub_logger.propagate, [h.stream for h in hubs_own]
  own, at_root = io.StringIO(), io.StringIO()
  try:
    common.setup_logging()
    logging.root.handlers[0].setStream(at_root)
    for handler in hubs_own:
      handler.setStream(own)
    hf_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    hf_logging.get_logger("huggingface_hub.file_download").error("a real failure")
  finally:
    hub_logger.setLevel(saved[0])
    hub_logger.propagate = saved[1]
    for handler, stream in zip(hubs_own, saved[2]):
      handler.setStream(stream)
  assert (own.getvalue(), at_root.getvalue()) == ("a real failure\n", "")  # Once.
