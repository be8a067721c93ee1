"""benchmarks/gpu.sh, the first accelerator run's script, in its CPU smoke mode."""

import json
import os
import subprocess

import pytest

from jaxcls.benchmark import REPO_ROOT, gpu


@pytest.mark.slow  # Compiles a step and trains the flagship recipe for one short epoch.
def test_gpu_script_smoke_mode_prints_and_writes_one_json_line_per_figure(tmp_path):
  out = tmp_path / "out"
  result = subprocess.run(
      ["bash", os.path.join(REPO_ROOT, "benchmarks", "gpu.sh"), "--smoke",
       "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600,
      env={**os.environ, "OUT": str(out)})
  assert result.returncode == 0, result.stderr[-3000:]
  printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [p["figure"] for p in printed] == ["synthetic", "loader", "flagship", "total"]
  written = [json.loads(line) for line in (out / gpu.OUT_FILE).read_text().splitlines()]
  assert written == printed[:3]  # The same lines, as each figure was measured.
  synthetic, loader, flagship = printed[:3]
  for figure in printed[:3]:
    assert figure["platform"] == "cpu" and figure["devices"] >= 1
  assert synthetic["model"] == "cnn" and synthetic["image_size"] == 32
  assert synthetic["batch_size"] == 8 and synthetic["steps_timed"] == 2
  assert synthetic["loss_finite"] is True
  assert synthetic["step_images_per_sec"] > 0 and synthetic["compile_s"] > 0
  assert synthetic["step_flops_per_image"] > 0 and synthetic["matmul_peak_gflops"] > 0
  assert synthetic["compilation_cache"]  # The persistent cache was on.
  assert loader["jpeg_size"] == [500, 375] and loader["jpegs"] == 16
  assert loader["loader_steps_timed"] == 3 and loader["loader_images_per_sec"] > 0
  assert loader["host_images_per_sec"] > 0 and loader["decode_cpu_ms_per_image"] > 0
  assert loader["projected_16_core_images_per_sec"] == pytest.approx(
      16 * 1000 / loader["decode_cpu_ms_per_image"], rel=0.01)  # Both rounded.
  assert flagship["recipe"] == "configs/catdog.py"
  assert "--config.data.source=generated:shapes" in flagship["command"]
  assert flagship["finished"] is True and flagship["returncode"] == 0
  assert len(flagship["epochs"]) == 1 and flagship["epochs"][0]["epoch"] == 1
  assert 0.0 <= flagship["epochs"][0]["accuracy"] <= 1.0
  assert 0 < flagship["epochs"][0]["wall_s"] <= flagship["wall_s"]
  assert flagship["best_val_accuracy"] == flagship["epochs"][0]["accuracy"]
  assert set(flagship["time_to_accuracy_s"]) == {"0.80", "0.85", "0.90"}


def test_the_flagship_data_is_found_beside_or_inside_the_checkout(tmp_path, monkeypatch):
  # A development machine has ../shared/data beside the checkout; the device machine's
  # copy of the working tree has shared/data inside it.
  checkout = tmp_path / "repo"
  for folder, expected in (("shared/data", "repo/shared/data"), ("../shared/data",
                                                                   "shared/data")):
    zip_dir = checkout / folder
    zip_dir.mkdir(parents=True)
    (zip_dir / gpu.PETIMAGES_ZIP).write_bytes(b"PK")
    monkeypatch.setattr(gpu, "REPO_ROOT", str(checkout))
    assert gpu.find_petimages() == str(tmp_path / expected / gpu.PETIMAGES_ZIP)
    (zip_dir / gpu.PETIMAGES_ZIP).unlink()
  assert gpu.find_petimages() is None
  args = gpu.parse([])
  assert gpu._flagship_command(args, str(tmp_path)).startswith(  # pylint: disable=protected-access
      f"no {gpu.PETIMAGES_ZIP} in ../shared/data or shared/data")


def test_smoke_sizes_yield_to_flags_given_on_the_command_line():
  args = gpu.parse(["--smoke", "--batch-size", "16"])
  assert args.batch_size == 16 and args.model == "cnn" and args.image_size == 32
  args = gpu.parse([])
  assert (args.model, args.image_size, args.dtype, args.batch_size) == (
      "resnet50", 224, "bfloat16", 256)
