"""jaxcls.data.inspect (counts, grid) and jaxcls.benchmark (JPEG writer, figure registry)."""

import pytest
import os

from PIL import Image

from jaxcls.benchmark import loader as benchmark
from jaxcls.data import inspect as inspect_lib
from jaxcls.data import sources


@pytest.mark.slow
def test_summary_counts_and_grid(shapes_dir, make_config, tmp_path):
  config = make_config("folder:" + shapes_dir)
  dataset = sources.build_dataset(config.data, config.seed, str(tmp_path))
  summary = inspect_lib.summarize(dataset, str(tmp_path))
  assert summary["classes"] == ["disc", "stripes"]
  assert summary["train_size"] + summary["val_size"] == 132
  assert sum(summary["train_per_class"].values()) == summary["train_size"]
  assert summary["train_per_class"]["disc"] == dataset.train.labels.count(0)
  assert summary["skipped"] == 0
  images, labels = inspect_lib.augmented_examples(dataset, config, 6)
  assert images.shape == (6, 16, 16, 3) and len(labels) == 6
  out = str(tmp_path / "grid.png")
  inspect_lib.write_grid(images, labels, dataset.class_names, out)
  with Image.open(out) as grid:
    assert grid.size[0] > 200 and grid.size[1] > 200


def test_photo_jpegs_are_500x375_and_listed_as_two_classes(tmp_path):
  benchmark.write_photo_jpegs(str(tmp_path), per_class=2)
  source, class_names = sources.list_folder(str(tmp_path))
  assert class_names == ("cat", "dog") and len(source) == 4
  with Image.open(os.path.join(source.root, source.paths[0])) as image:
    assert image.size == (500, 375) and image.format == "JPEG"


def test_figures_are_registered_and_combined(monkeypatch):
  monkeypatch.setitem(benchmark.FIGURES, "step", lambda b: {"step_images_per_sec": 200.0})
  monkeypatch.setitem(benchmark.FIGURES, "loop", lambda b: {"loop_images_per_sec": 190.0})

  @benchmark.register("extra")
  def extra(bench):
    return {"extra_figure": 1}

  try:
    results = benchmark.run_figures(None, ["step", "loop", "extra"])
  finally:
    del benchmark.FIGURES["extra"]
  assert results == {"step_images_per_sec": 200.0, "loop_images_per_sec": 190.0,
                     "extra_figure": 1, "loop_over_step": 0.95}
