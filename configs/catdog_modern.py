"""Cats vs dogs from scratch with a modern recipe: AdamW, a weight average, random resized
crops, TrivialAugment, mixup, label smoothing.

    python run_train.py --config configs/catdog_modern.py --workdir /tmp/catdog_modern

reads TFDS `cats_vs_dogs` like configs/catdog.py (or --config.data.source=zip:... /
folder:...), with the same CNN and image size, so the two recipes differ only in how
they train. Predict with the weight average: jaxcls-predict --workdir DIR --weights ema.

Accuracy on PetImages: not measured (the development machines cannot download it). On
scikit-learn's digits (1,797 real 8×8 scans at 16 px, tests/test_recipes.py), in the
tests' budget, it reaches at least what configs/catdog.py reaches.
"""

from jaxcls.config import base_config


def get_config():
  config = base_config()
  config.data.source = "tfds:cats_vs_dogs"
  config.data.train_split = "train[:80%]"  # cats_vs_dogs has only a train split.
  config.data.val_split = "train[80%:]"
  config.data.image_size = 128
  config.model.widths = (32, 64, 128, 256)
  config.model.dropout = 0.2
  config.num_epochs = 40
  config.optim.name = "adamw"
  config.optim.learning_rate = 2e-3
  config.optim.weight_decay = 0.05  # Decoupled: 0.05 × learning rate × w per step.
  config.optim.warmup_epochs = 2.0
  config.optim.ema_decay = 0.999
  config.augment.rotation = 0.0  # The crop and the policy move the pixels instead.
  config.augment.scale = (1.0, 1.0)
  config.augment.crop_area = (0.35, 1.0)
  config.augment.policy = "trivialaugment"
  config.augment.mixup_alpha = 0.2
  config.train.label_smoothing = 0.1
  return config
