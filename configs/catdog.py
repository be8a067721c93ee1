"""Cats vs dogs from scratch with the small CNN.

    python run_train.py --config configs/catdog.py --workdir /tmp/catdog

reads TFDS `cats_vs_dogs` (23,262 images; train[:80%] / train[80%:]), preparing it on
first use (download 787 MB, needs `pip install 'jaxcls[tfds]'` for TensorFlow CPU). With
a local copy of Microsoft's `kagglecatsanddogs_5340.zip` instead, no TensorFlow needed:

    python run_train.py --config configs/catdog.py --workdir /tmp/catdog \
        --config.data.source=zip:/path/to/kagglecatsanddogs_5340.zip

(or folder:/path/to/PetImages once extracted; Cat/ and Dog/, 12,500 JPEGs each; the
broken ones are skipped and listed in WORKDIR/skipped_files.jsonl). Accuracy on the real
data has not been measured here yet: this machine cannot download the data set.
"""

from jaxcls.config import base_config


def get_config():
  config = base_config()
  config.data.source = "tfds:cats_vs_dogs"
  config.data.train_split = "train[:80%]"  # cats_vs_dogs has only a train split.
  config.data.val_split = "train[80%:]"
  config.data.image_size = 128
  config.augment.rotation = 15.0
  config.augment.scale = (0.85, 1.15)
  config.model.widths = (32, 64, 128, 256)
  config.model.dropout = 0.4
  config.num_epochs = 30
  config.optim.warmup_epochs = 1.0
  return config
