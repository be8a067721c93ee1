"""Published weights converted by jaxcls, against the PyTorch model they came from.

    python benchmarks/pretrained_vs_pytorch.py [--size 224] [--batch 4]

For each case, random weights are drawn in the reference PyTorch models of
tests/torch_models.py (torchvision's and timm's module names, checked against timm
1.0.31's own models), published behind the local stand-ins of the Hugging Face hub and
download.pytorch.org in tests/weight_servers.py, and imported with
`jaxcls-pretrained import` into fresh caches (timed twice: the first run downloads, the
second reads the cache). Then both models classify the same random images: the
norm-wise and largest logit differences, beside the float32 bound the tests use.
Needs torch.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from jaxcls.cli import pretrained as pretrained_cli  # noqa: E402
from jaxcls.pretrained import torch_hub  # noqa: E402
from jaxcls.serve import Predictor  # noqa: E402
from numerics import agreement, normwise_error  # noqa: E402
from torch_models import state_dict_arrays, torch_convnext, torch_logits, torch_resnet  # noqa: E402
from weight_servers import FileServer, HubServer, hub_environment  # noqa: E402


def _hub_files(model, architecture: str) -> dict:
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "model.safetensors")
    save_file(state_dict_arrays(model), path)
    with open(path, "rb") as f:
      weights = f.read()
  config = {"architecture": architecture, "num_classes": 1000}
  return {"model.safetensors": weights, "config.json": json.dumps(config).encode()}


def _timed_imports(source: str, root: str) -> list[float]:
  times = []
  for attempt in range(2):
    start = time.perf_counter()
    code = pretrained_cli.main(["import", "--weights", source, "--out",
                                os.path.join(root, f"out{attempt}")])
    times.append(time.perf_counter() - start)
    assert code == 0, source
  return times


def _hub_case(model, architecture: str, root: str) -> tuple[str, list[float]]:
  repo = f"timm/{architecture}.random"
  with HubServer({repo: _hub_files(model, architecture)}) as server, \
      hub_environment(os.path.join(root, "hf"), server.url):
    return os.path.join(root, "out0"), _timed_imports("hf-hub:" + repo, root)


def _torchvision_case(model, root: str) -> tuple[str, list[float]]:
  buffer = io.BytesIO()
  torch.save(model.state_dict(), buffer)
  name = f"resnet50-{hashlib.sha256(buffer.getvalue()).hexdigest()[:8]}.pth"
  torch_hub.RELEASES[("resnet50", "RANDOM")] = name
  os.environ["TORCH_HOME"] = os.path.join(root, "torch")
  with FileServer({name: buffer.getvalue()}) as server:
    os.environ[torch_hub.URL_ENV] = server.url
    return os.path.join(root, "out0"), _timed_imports("torchvision:resnet50.RANDOM", root)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=4)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3),
                                             dtype=np.uint8)
  resnet = torch_resnet("resnet50", 1000)
  convnext = torch_convnext((3, 3, 9, 3), (96, 192, 384, 768), 1000)
  cases = [  # (what, reference model, how it is published and imported, float32 bound)
      ("resnet50, hf-hub:", resnet, lambda r: _hub_case(resnet, "resnet50", r),
       agreement(50, 3 * 3 * 512)),
      ("resnet50, torchvision:", resnet, lambda r: _torchvision_case(resnet, r),
       agreement(50, 3 * 3 * 512)),
      ("convnext_tiny, hf-hub:", convnext, lambda r: _hub_case(convnext, "convnext_tiny", r),
       agreement(82, 4 * 768))]
  print("| model, source | first import (downloads) | second (cached) | norm-wise | "
        "max abs | float32 bound |")
  for name, reference, run_case, bound in cases:
    with tempfile.TemporaryDirectory() as root:
      workdir, (first, second) = run_case(root)
      predictor = Predictor.from_workdir(workdir)
      got = np.asarray(predictor.model.apply(predictor.variables, images, train=False))
    expected = torch_logits(reference, images)
    print(f"| {name} | {first:.1f} s | {second:.1f} s | {normwise_error(got, expected):.1e} | "
          f"{np.max(np.abs(got - expected)):.1e} | {bound:.1e} |")


if __name__ == "__main__":
  main()
