"""tfds: sources through the real `tfds.data_source` path, under `tfds.testing.mock_data`."""

import importlib.util
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxcls import train
from jaxcls.data import inspect as inspect_lib
from jaxcls.data import loader, preprocess, sources

HAVE_TF = importlib.util.find_spec("tensorflow") is not None


def catdog_config(make_config, **overrides):
  return make_config("tfds:cats_vs_dogs", **{
      "data.train_split": "train[:80%]", "data.val_split": "train[80%:]", **overrides})


def test_tfds_records_are_encoded_bytes_through_the_one_preprocess(mock_cats_vs_dogs,
                                                                    make_config):
  config = catdog_config(make_config)
  dataset = sources.build_dataset(config.data, config.seed)
  assert dataset.class_names == ("cat", "dog")  # From the TFDS ClassLabel feature.
  assert isinstance(dataset.train, sources.TfdsSource)
  record = dataset.train[3]
  assert isinstance(record["data"], bytes)  # SkipDecoding: no TFDS-side decode.
  assert record["label"] in (0, 1)
  assert dataset.train.labels[3] == record["label"] and len(dataset.train.labels) == 32
  summary = inspect_lib.summarize(dataset)
  assert summary["train_size"] == 32 and sum(summary["train_per_class"].values()) == 32
  batch = next(loader.train_batches(dataset.train, batch_size=8, image_size=16, seed=0,
                                    num_steps=1))
  first = loader.grain.MapDataset.range(len(dataset.train)).shuffle(seed=0)[0]
  expected = preprocess.load_image(dataset.train[first]["data"], 16)
  np.testing.assert_array_equal(batch["image"][0], expected)
  assert batch["label"][0] == dataset.train[first]["label"]


@pytest.mark.slow
def test_tfds_trains_a_few_steps(mock_cats_vs_dogs, make_config, tmp_path):
  config = catdog_config(make_config, **{"data.cache": "memory"})
  state, summary = train.train_and_evaluate(config, str(tmp_path))
  last = summary.last_epoch
  assert last.step == 32 // 16 and last.epoch == 1
  assert np.isfinite(last.train_loss) and np.isfinite(last.val_loss)
  assert 0.0 <= last.val_accuracy <= 1.0
  assert int(state.step) == 2
  assert open(tmp_path / sources.SKIPPED_FILE).read() == ""


def test_unknown_split_names_the_keys(mock_cats_vs_dogs, make_config):
  # mock_data accepts any split, so check the config schema instead.
  from jaxcls import config as config_lib
  config = catdog_config(make_config, **{"data.val_split": ""})
  with pytest.raises(config_lib.ConfigError, match="data.val_split"):
    config_lib.validate(config)


def test_offline_prepare_error_names_folder_and_zip(monkeypatch, make_config, tmp_path):
  """An unprepared set with no network: the error says how to use a local copy."""
  import requests
  monkeypatch.setattr(sources.tfds, "_import_tensorflow_cpu", lambda: None)
  def no_network(self, **kwargs):
    raise requests.exceptions.ConnectionError("Failed to resolve 'download.microsoft.com'")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
  config = catdog_config(make_config, **{"data.tfds_data_dir": str(tmp_path / "tfds")})
  with pytest.raises(sources.DataError) as error:
    sources.build_dataset(config.data, config.seed)
  message = str(error.value)
  assert "folder:" in message and "zip:" in message and "download" in message
  assert not os.path.exists(tmp_path / "tfds" / "cats_vs_dogs" / "4.0.1" / "dataset_info.json")


@pytest.mark.skipif(HAVE_TF, reason="checks the message shown when TensorFlow is missing")
def test_prepare_without_tensorflow_says_how_to_install(make_config, tmp_path):
  config = catdog_config(make_config, **{"data.tfds_data_dir": str(tmp_path / "tfds")})
  with pytest.raises(sources.DataError, match="tensorflow-cpu.*folder:.*zip:"):
    sources.build_dataset(config.data, config.seed)
