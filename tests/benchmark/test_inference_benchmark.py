"""The inference benchmark: its figures are the timings it took; it runs end to end."""

import json

import numpy as np
import pytest

from jaxcls.benchmark import inference


def test_figures_are_the_medians_of_the_timed_calls(monkeypatch):
  """A fake clock that each engine advances by a known time per call: the figures must
  be exactly those times, and every engine is warmed up on both shapes first."""
  now = [0.0]
  monkeypatch.setattr(inference.time, "perf_counter", lambda: now[0])
  calls = {"slow": [], "fast": []}

  def engine(name, batch_seconds, single_seconds):
    def run(images):
      calls[name].append(len(images))
      now[0] += batch_seconds if len(images) > 1 else single_seconds
      return np.zeros((len(images), 2), np.float32)
    return run

  runs = {"slow": engine("slow", 0.5, 0.02), "fast": engine("fast", 0.1, 0.004)}
  figures = inference.measure(runs, np.zeros((8, 4, 4, 3), np.uint8), repeats=3,
                              latency_calls=4)
  assert figures["slow"] == {"images_per_s": pytest.approx(16.0),
                             "latency_ms": pytest.approx(20.0),
                             "latency_p90_ms": pytest.approx(20.0)}
  assert figures["fast"]["images_per_s"] == pytest.approx(80.0)
  assert figures["fast"]["latency_ms"] == pytest.approx(4.0)
  # Warm-up (8, then 1), then 3 rounds of one batch and 4 single images.
  assert calls["slow"] == calls["fast"] == [8, 1] + [8, 1, 1, 1, 1] * 3


@pytest.mark.slow
def test_benchmark_prints_three_engines_that_agree(capsys):
  assert inference.main(["--image-size", "16", "--widths", "8", "--batch", "4",
                         "--repeats", "1"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["model"] == "CNN (8,)" and result["image_size"] == 16
  assert set(result["engines"]) == {"predictor", "jax_export", "onnxruntime"}
  for figures in result["engines"].values():
    assert figures["images_per_s"] > 0 and 0 < figures["latency_ms"] <= (
        figures["latency_p90_ms"])
  # Probabilities agree as the export tests require (tests/serve/test_onnx_export.py).
  assert set(result["max_abs_difference_from_predictor"]) == {"jax_export", "onnxruntime"}
  assert max(result["max_abs_difference_from_predictor"].values()) <= 1e-5


def test_bad_flags_exit_2(capsys):
  assert inference.main(["--repeats", "0"]) == 2
  assert capsys.readouterr().err == ("error: --batch 64 --repeats 0: both must be at "
                                     "least 1.\n")
