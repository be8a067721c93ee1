"""The step benchmark's figures, its JSON, the training compilation cache and the
convolution benchmark's sums."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from jaxcls import cpu
from jaxcls.benchmark import step as step_benchmark
from jaxcls.cpu import allocator, onednn

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.


def test_step_flops_grow_with_pixels(make_config):
  """FLOPs per image come from XLA's cost analysis of the step: 4x the pixels, ~4x."""
  small = step_benchmark.measure_train_step(
      make_config("generated:shapes", **{"data.image_size": 16}), steps=2, warmup=1)
  large = step_benchmark.measure_train_step(
      make_config("generated:shapes", **{"data.image_size": 32}), steps=2, warmup=1)
  assert small["devices"] == 8 and small["batch_size"] == 16
  assert small["loss_finite"] and large["loss_finite"]
  assert small["step_images_per_sec"] > 0 and small["compile_s"] > 0
  ratio = large["step_flops_per_image"] / small["step_flops_per_image"]
  assert 3.0 < ratio < 4.5, ratio
  expected = small["step_flops_per_image"] * 16 / (small["step_ms_median"] / 1e3) / 1e9
  assert small["achieved_gflops"] == pytest.approx(expected, rel=0.05)
  # Progressive resizing: the step training runs, 32 px batches resized to 16 on the
  # device: the network's work at 16 px plus the resize, well short of 32 px's.
  resized = step_benchmark.measure_train_step(
      make_config("generated:shapes", **{"data.image_size": 32,
                                         "train.progressive_sizes": (16,)}),
      steps=1, warmup=0)
  assert (resized["image_size"], resized["train_image_size"]) == (32, 16)
  assert small["train_image_size"] == 16
  ratio = resized["step_flops_per_image"] / small["step_flops_per_image"]
  assert 1.0 < ratio < 2.0, ratio


def test_no_augment_removes_the_resampling_flops(make_config):
  config = make_config("generated:shapes", **{"augment.rotation": 15.0})
  on = step_benchmark.measure_train_step(config, steps=1, warmup=0)
  off = step_benchmark.measure_train_step(config, steps=1, warmup=0, augment=False)
  assert off["augment"] is False
  assert off["step_flops_per_image"] < on["step_flops_per_image"]
  assert config.augment.rotation == 15.0  # The caller's config is not changed.


def test_matmul_peak_is_a_positive_rate():
  result = step_benchmark.matmul_peak(256, repeats=2)
  assert result["matmul_size"] == 256 and result["matmul_dtype"] == "float32"
  assert 0.01 < result["matmul_peak_gflops"] < 1e5


def test_training_cli_fills_the_compilation_cache(tmp_path, shapes_dir):
  """A training run through the CLI writes its compiled programs to the cache folder."""
  cache = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
  env.update(JAXCLS_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run_train.py"), "--config",
       os.path.join(ROOT, "configs/demo.py"), "--workdir", str(tmp_path / "w"),
       f"--config.data.source=folder:{shapes_dir}", "--config.data.image_size=16",
       "--config.model.widths=(4,)", "--config.num_epochs=1", "--config.batch_size=32",
       "--config.train.log_images=0", "--config.train.progress_bar=False"],
      capture_output=True, text=True, timeout=120, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(list(cache.iterdir())) >= 3  # init, train step, eval step at least.


def _tiny_recipe(tmp_path):
  """A recipe file with a 16 px, one-block CNN and batch 8."""
  recipe = tmp_path / "recipe.py"
  recipe.write_text("from jaxcls.config import base_config\n"
                    "def get_config():\n"
                    "  c = base_config()\n"
                    "  c.data.image_size = 16\n"
                    "  c.model.widths = (4,)\n"
                    "  c.batch_size = 8\n"
                    "  return c\n")
  return recipe


def test_cli_prints_json(capsys, make_config, tmp_path):
  recipe = _tiny_recipe(tmp_path)
  result = step_benchmark.run(["--config", str(recipe), "--steps", "1", "--warmup", "0",
                                "--matmul-size", "128", "--config.model.dropout=0.0"])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["step_images_per_sec"] == result["step_images_per_sec"] > 0
  assert printed["percent_of_peak"] == pytest.approx(
      100 * printed["achieved_gflops"] / printed["matmul_peak_gflops"], abs=0.2)
  assert printed["cpu_fast_convolutions"] == onednn.available()


def test_step_flops_count_onednn_convolutions(make_config):
  """XLA counts nothing inside a custom call: with oneDNN's convolutions the step's FLOPs
  are counted on the same step with XLA's, and agree with that step's own count."""
  if not onednn.available():
    pytest.skip(f"oneDNN unavailable: {onednn.unavailable_reason()}")
  config = make_config("generated:shapes", **{"data.image_size": 32})
  ours = step_benchmark.measure_train_step(config, steps=1, warmup=0)
  with cpu.disabled():
    theirs = step_benchmark.measure_train_step(config, steps=1, warmup=0)
  # The same program compiled the same way: the same count.
  assert ours["step_flops_per_image"] == theirs["step_flops_per_image"] > 0


@pytest.mark.slow
def test_benchmark_step_command_line_exits_zero_with_json(tmp_path):
  recipe = _tiny_recipe(tmp_path)
  result = subprocess.run(
      [sys.executable, "-m", "jaxcls.cli.benchmark", "step", "--config", str(recipe),
       "--steps", "1", "--warmup", "0", "--matmul-size", "128"],
      capture_output=True, text=True, timeout=120, cwd=ROOT,
      env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed["batch_size"] == 8 and printed["step_flops_per_image"] > 0
  # The command line re-executed itself with huge-page allocation where that applies.
  tuned = allocator.tuned_environment_here(os.environ)
  assert printed["glibc_tunables"] == (tuned or os.environ).get("GLIBC_TUNABLES", "")
  assert tuned is None or "glibc.malloc.hugetlb=1" in printed["glibc_tunables"]


def test_conv_kernels_benchmark_adds_up_every_resnet18_convolution():
  pytest.importorskip("torch")
  result = subprocess.run(
      [sys.executable, "-m", "jaxcls.cli.benchmark", "conv-kernels", "--batch-size", "2",
       "--image-size", "32", "--rounds", "1", "--threads", "1"], capture_output=True,
      text=True, check=True, timeout=300, cwd=ROOT)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  shapes = report["shapes"]
  # 20 convolutions: the stem, 16 3×3 in the blocks (3 of them strided), 3 1×1 shortcuts.
  assert sum(row["runs_per_step"] for row in shapes) == 20
  sides = ("xla", "jaxcls", "pytorch") if onednn.available() else ("xla", "pytorch")
  assert ("ratio_jaxcls_over_pytorch" in report) == onednn.available()
  for side in sides:
    total = sum(row["runs_per_step"]
                * (row[f"{side}_forward_ms"] + row[f"{side}_backward_ms"]) for row in shapes)
    assert report[f"{side}_ms"] == pytest.approx(total, abs=0.06)
    assert all(row[f"{side}_forward_ms"] > 0 for row in shapes)
  assert report["torch_threads"] == 1
