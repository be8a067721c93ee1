"""Cats vs dogs from scratch, larger: for accelerators, aimed at 97% validation accuracy.

    python run_train.py --config configs/catdog_large.py --workdir /tmp/catdog_large

reads TFDS `cats_vs_dogs` as configs/catdog.py does (or --config.data.source=zip:...).
The flagship's recipe scaled up where a GPU has room: ResNet-9 with the stride-2 stem
(no stem pooling) and twice the widths, 176 px photos reached by progressive resizing
(112, 144, 176), 60 epochs, batch 256 at the linearly scaled learning rate, and a weight
average (predict with --weights ema). Layers compute in bfloat16 on GPUs and TPUs
(model.dtype "auto").

Measured: only its cost, on a 2-core CPU (a 60-epoch run there would take days):
benchmarks/README.md#catdog_large gives its FLOPs per image, its CPU time per epoch and
the accelerator time they project. Its accuracy has not been measured.
"""

from jaxcls.config import base_config


def get_config():
  config = base_config()
  config.data.source = "tfds:cats_vs_dogs"
  config.data.train_split = "train[:80%]"  # cats_vs_dogs has only a train split.
  config.data.val_split = "train[80%:]"
  config.data.image_size = 176  # The photos of the prepared zip are 180 px.
  config.data.cache = "memory"  # 20,000 photos at 176 px: 1.9 GB.
  config.model.name = "resnet9"
  config.model.widths = (64, 128, 256, 512)
  config.model.flip_test = True
  config.batch_size = 256
  config.num_epochs = 60
  config.train.progressive_sizes = (112, 144, 176)
  config.train.label_smoothing = 0.1
  config.optim.learning_rate = 0.2  # 0.05 per 64 images, as configs/catdog.py.
  config.optim.warmup_epochs = 3.0
  config.optim.ema_decay = 0.999
  return config
