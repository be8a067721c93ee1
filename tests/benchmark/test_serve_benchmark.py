"""`jaxcls-benchmark serve`: it runs, and its figures add up."""

import json

import pytest

from jaxcls.benchmark import COMMANDS
from jaxcls.benchmark import serve as benchmark


@pytest.mark.slow
def test_serve_benchmark_figures_add_up(capsys):
  assert COMMANDS["serve"] == "jaxcls.benchmark.serve"
  assert benchmark.main(["--image-size", "16", "--widths", "8,16", "--requests", "12",
                         "--concurrency", "1,3", "--images", "4", "--batch-sizes", "1,2,8"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["batch_sizes"] == [1, 2, 8]
  assert out["startup_s"] > 0 and out["predictor_images_per_s"] > 0
  one, three = out["levels"]
  assert (one["concurrency"], three["concurrency"]) == (1, 3)
  for row in (one, three):
    assert row["requests"] == 12 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert row["over_predictor"] == pytest.approx(
        row["requests_per_s"] / out["predictor_images_per_s"], rel=1e-12)
    assert row["server_cpu_ms_per_request"] > 0  # Linux: read from /proc.
    assert row["cpu_over_predictor"] == pytest.approx(
        row["server_cpu_ms_per_request"] / out["predictor_cpu_ms_per_image"], rel=1e-12)
  # One client has one request in flight at a time: every model call holds one image;
  # three clients, at most three.
  assert one["images_per_model_call"] == 1.0 and one["model_calls"] == {"1": 12}
  assert one["padded_rows_used"] == 1.0
  assert sum(int(k) * v for k, v in three["model_calls"].items()) * three[
      "padded_rows_used"] == pytest.approx(12)
  assert 1.0 <= three["images_per_model_call"] <= 3.0
