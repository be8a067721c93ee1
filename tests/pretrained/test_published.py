"""Published weights end to end: served locally, converted, and checked against PyTorch.

The weights are random, drawn in reference PyTorch models with torchvision's and timm's
module names (torch_models.py), and published the way the hub and torchvision publish
them: timm's `model.safetensors` + `config.json` behind a local hub (HF_ENDPOINT), a
torchvision `.pth` behind a local download server (JAXCLS_TORCHVISION_URL). The
converted model's logits must be PyTorch's to the float32 bound of tests/numerics.py:
every layer a well-conditioned sum, `depth` layers adding their errors, the longest sum
setting the √n factor (ResNet-18: 17 convolutions and the output layer, longest sum a
3×3×512 convolution; ConvNeXt-T: 59 convolutions and linear layers and 23 layer norms,
longest sum the last stage's 4·768-wide second MLP layer).
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from conftest import ROOT, tiny_config
from jaxcls import evaluate, pretrained
from jaxcls.data import sources
from jaxcls.pretrained import torch_hub
from jaxcls.serve import Predictor
from jaxcls.train import train_and_evaluate
from numerics import agreement, ambiguous_argmax, assert_normwise_close, mean_loss_bound
from torch_models import state_dict_arrays, torch_convnext, torch_logits, torch_resnet
from weight_servers import FileServer, HubServer, hub_environment

pytestmark = pytest.mark.slow  # Converts and compiles whole networks.
torch = pytest.importorskip("torch")

RESNET18 = agreement(18, 3 * 3 * 512)
CONVNEXT_TINY = agreement(59 + 23, 4 * 768)
INCEPTION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # Not ImageNet's.


def timm_files(model, architecture: str, tmp_path, **config) -> dict:
  """model.safetensors and config.json as timm publishes them on the hub."""
  path = str(tmp_path / "model.safetensors")
  save_file(state_dict_arrays(model), path, metadata={"format": "pt"})
  with open(path, "rb") as f:
    weights = f.read()
  config = {"architecture": architecture, **config}
  return {"model.safetensors": weights, "config.json": json.dumps(config).encode()}


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def jax_logits(workdir: str, batch: np.ndarray) -> np.ndarray:
  predictor = Predictor.from_workdir(workdir)
  return np.asarray(predictor.model.apply(predictor.variables, batch, train=False))


def run(args, env):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **env})


def test_hub_resnet_imports_with_pytorch_logits_and_predicts_imagenet_names(tmp_path):
  model = torch_resnet("resnet18", num_classes=1000, seed=2)
  files = timm_files(model, "resnet18", tmp_path, num_classes=1000,
                     pretrained_cfg={**INCEPTION, "input_size": [3, 32, 32]})
  out, env = str(tmp_path / "imported"), {"HF_HOME": str(tmp_path / "hf")}
  with HubServer({"timm/resnet18.test": files}) as hub:
    result = run(["jaxcls.cli.pretrained", "import", "--weights",
                  "hf-hub:timm/resnet18.test", "--out", out], {**env, "HF_ENDPOINT": hub.url})
  assert result.returncode == 0, result.stderr
  batch = images(3, 32, seed=2)
  expected = torch_logits(model, batch, mean=(127.5,) * 3, std=(127.5,) * 3)
  assert np.std(expected) > 0.1  # Logits that differ, so the bound means something.
  assert_normwise_close(jax_logits(out, batch), expected, RESNET18, "ResNet-18 logits")
  predictor = Predictor.from_workdir(out)
  assert predictor.class_names == pretrained.imagenet_class_names()
  assert predictor.image_size == 32 and tuple(predictor.model.mean) == (127.5,) * 3
  # `jaxcls-predict` on the fresh workdir names ImageNet classes. Within the bound no
  # logit moves by more than RESNET18 · ‖logits‖, and the top one leads the next by more
  # than twice that, so the label must be PyTorch's.
  top2 = np.sort(expected[0])[-2:]
  assert top2[1] - top2[0] > 2 * RESNET18 * np.linalg.norm(expected[0])
  image = str(tmp_path / "image.png")
  Image.fromarray(batch[0]).save(image)
  result = run(["jaxcls.cli.predict", "--workdir", out, image], {})
  assert result.returncode == 0, result.stderr
  label = pretrained.imagenet_class_names()[int(np.argmax(expected[0]))]
  assert result.stdout.split("\t")[:2] == [image, label], result.stdout
  # A second import needs no network: the hub cache has the files.
  result = run(["jaxcls.cli.pretrained", "import", "--weights",
                "hf-hub:timm/resnet18.test", "--out", str(tmp_path / "again")],
               {**env, "HF_HUB_OFFLINE": "1"})
  assert result.returncode == 0, result.stderr


def test_torchvision_resnet_from_torch_hubs_cache_matches_pytorch(tmp_path, monkeypatch):
  model = torch_resnet("resnet18", num_classes=1000, seed=3)
  buffer = io.BytesIO()
  torch.save(model.state_dict(), buffer)
  data = buffer.getvalue()
  name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # torchvision's naming.
  monkeypatch.setitem(torch_hub.RELEASES, ("resnet18", "TEST"), name)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  with FileServer({name: data}) as server:
    monkeypatch.setenv(torch_hub.URL_ENV, server.url)
    out = pretrained.import_weights(None, "torchvision:resnet18.TEST",
                                    str(tmp_path / "imported"))
  assert os.path.isfile(tmp_path / "torch" / "hub" / "checkpoints" / name)
  batch = images(2, 32, seed=3)
  assert_normwise_close(jax_logits(out, batch), torch_logits(model, batch), RESNET18,
                        "ResNet-18 logits")
  predictor = Predictor.from_workdir(out)
  assert predictor.image_size == 224
  assert predictor.class_names[:2] == ("tench", "goldfish")
  assert tuple(predictor.model.std) == pretrained.IMAGENET_STD


def test_hub_convnext_tiny_matches_timms_logits(tmp_path):
  dims = (96, 192, 384, 768)
  model = torch_convnext((3, 3, 9, 3), dims, num_classes=10, seed=4)
  labels = [f"n{i:08d}" for i in range(10)]
  files = timm_files(model, "convnext_tiny", tmp_path, num_classes=10, label_names=labels,
                     label_descriptions={label: f"class {label[-1]}" for label in labels},
                     pretrained_cfg={"input_size": [3, 224, 224],
                                     "test_input_size": [3, 288, 288]})
  with HubServer({"timm/convnext_tiny.test": files}) as hub, \
      hub_environment(str(tmp_path / "hf"), hub.url):
    out = pretrained.import_weights(None, "hf-hub:timm/convnext_tiny.test",
                                    str(tmp_path / "imported"))
  batch = images(2, 32, seed=4)
  expected = torch_logits(model, batch)  # timm's default mean and std are ImageNet's.
  assert np.std(expected) > 0.1
  assert_normwise_close(jax_logits(out, batch), expected, CONVNEXT_TINY,
                        "ConvNeXt-T logits")
  predictor = Predictor.from_workdir(out)
  assert predictor.class_names == tuple(f"class {i}" for i in range(10))
  assert predictor.image_size == 288 and predictor.variables["batch_stats"] == {}


def test_init_from_the_hub_starts_a_run_and_resumes_offline(shapes_dir, tmp_path):
  model = torch_resnet("resnet18", num_classes=1000, seed=5)
  files = timm_files(model, "resnet18", tmp_path, num_classes=1000,
                     pretrained_cfg=INCEPTION)
  spec, workdir = "hf-hub:timm/resnet18.test", str(tmp_path / "run")
  config = tiny_config(f"folder:{shapes_dir}", init_from=spec,
                       **{"model.name": "resnet18", "optim.freeze": "backbone"})
  with HubServer({"timm/resnet18.test": files}) as hub, \
      hub_environment(str(tmp_path / "hf"), hub.url):
    state, _ = train_and_evaluate(config, workdir)
    converted = pretrained.load(spec).variables
  trained = {"params": state.params, "batch_stats": state.batch_stats}
  for part in ("params", "batch_stats"):  # Frozen: the published backbone, bit for bit.
    assert (jax.tree.structure(trained[part]["backbone"])
            == jax.tree.structure(converted[part]["backbone"]))
    for a, b in zip(jax.tree.leaves(trained[part]["backbone"]),
                    jax.tree.leaves(converted[part]["backbone"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert tuple(Predictor.from_workdir(workdir).model.mean) == (127.5,) * 3
  # Resuming reads the run's own checkpoint: no hub, no network, no cache needed.
  config.num_epochs = 2
  with hub_environment(str(tmp_path / "empty"), offline=True):
    _, summary = train_and_evaluate(config, workdir)
  assert summary.last_epoch.epoch == 2
  # Scored on a folder holding exactly its validation files, the fine-tuned model gets
  # the accuracy its last evaluation recorded (bar images whose top two logits are
  # within rounding: 8 pmapped devices there, one jit here).
  dataset = sources.build_dataset(config.data, config.seed)
  val_dir = tmp_path / "validation_files"
  for path in dataset.val.paths:
    (val_dir / path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(dataset.val.root, path), val_dir / path)
  result = evaluate.evaluate(workdir, f"folder:{val_dir}", step=summary.final_step,
                             progress=False).evaluation
  resnet18 = agreement(17 + 2, 3 * 3 * 512)
  slack = int(np.sum(ambiguous_argmax(result.logits, resnet18)))
  assert len(result.labels) == len(dataset.val)
  assert (abs(result.accuracy - summary.last_epoch.val_accuracy) * len(result.labels)
          <= slack + 1e-9)
  assert abs(result.loss - summary.last_epoch.val_loss) <= mean_loss_bound(
      result.logits, result.losses, resnet18)
