"""Cats vs dogs from scratch: ResNet-9 with a stride-4 stem, 128 px, mirror at test time.

    python run_train.py --config configs/catdog.py --workdir /tmp/catdog

reads TFDS `cats_vs_dogs` (train[:80%] / train[80%:]), preparing it on first use
(download 787 MB, needs `pip install 'jaxcls[tfds]'`). With Microsoft's zip or its
extracted folder instead, no TensorFlow needed (broken files are skipped and listed in
WORKDIR/skipped_files.jsonl):

    python run_train.py --config configs/catdog.py --workdir /tmp/catdog \\
        --config.data.source=zip:/path/to/kagglecatsanddogs_5340.zip

Measured on 20,031 real PetImages photos (a 180 px copy of that zip, read in place;
16,016 train / 4,015 validation by jaxcls's hash split), from scratch, on a 2-core AMD
EPYC VM, CPU only, 2026-12-07: validation accuracy 0.9465 after 30 epochs, 44 min 30 s
for the whole command (0.90 at 17 min, 0.94 at 37 min); the 0.95 aimed at is not reached
yet. The curve and the pilots behind each choice: benchmarks/README.md#real-photos.

Why each line: the stride-4 stem (a stride-2 convolution, then 2×2 pooling) makes a
128 px photo cost 0.17 GFLOP, a ninth of the plain CNN at the same size, and the pilots
learned about as much per epoch either way; crops because the 26-epoch run without them
ended at 0.943 with train accuracy 0.979 (overfitting); label smoothing 0.1; the mirror
at test time; the decoded cache, so only the first epoch decodes JPEGs (1 GB at 128 px).
"""

from jaxcls.config import base_config


def get_config():
  config = base_config()
  config.data.source = "tfds:cats_vs_dogs"
  config.data.train_split = "train[:80%]"  # cats_vs_dogs has only a train split.
  config.data.val_split = "train[80%:]"
  config.data.image_size = 128
  config.data.cache = "memory"  # The first epoch decodes; 20,000 photos: 1 GB.
  config.model.name = "resnet9_s4"
  config.model.widths = (32, 64, 128, 256)
  config.model.flip_test = True
  config.num_epochs = 30
  config.augment.crop_area = (0.5, 1.0)
  config.train.label_smoothing = 0.1
  config.optim.warmup_epochs = 1.0
  return config
