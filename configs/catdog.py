"""Cats vs dogs from scratch with the small CNN.

    python run_train.py --config configs/catdog.py --workdir /tmp/catdog \
        --config.data.source=folder:/path/to/PetImages

PetImages is the folder inside Microsoft's `kagglecatsanddogs_5340.zip` (Cat/ and
Dog/, 12,500 JPEGs each; about 1,700 of them are broken and are skipped and listed in
WORKDIR/skipped_files.jsonl). Accuracy on the real data has not been measured here yet:
this machine cannot download the data set.
"""

from jaxcls.config import base_config


def get_config():
  config = base_config()
  config.data.source = "folder:PetImages"
  config.data.image_size = 128
  config.data.val_fraction = 0.2
  config.augment.flip = True
  config.augment.rotation = 15.0
  config.augment.scale = (0.85, 1.15)
  config.model.name = "cnn"
  config.model.widths = (32, 64, 128, 256)
  config.model.dropout = 0.4
  config.batch_size = 64
  config.num_epochs = 30
  config.optim.learning_rate = 0.05
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.warmup_epochs = 1.0
  config.train.log_every_steps = 50
  return config
