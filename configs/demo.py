"""Offline demo: discs vs stripes drawn on the fly, trained on a laptop CPU.

    python run_train.py --config configs/demo.py --workdir /tmp/demo

Draws 500 images per class (JPEG and PNG, random colours, sizes, positions and noise)
into WORKDIR/generated_shapes, trains the small CNN at 32 px for 10 epochs and validates
after each. Reaches validation accuracy 1.000 from epoch 3 (2026-12-02, 2-core CPU; the
README's results table, the time in benchmarks/README.md).
"""

from jaxcls.config import base_config


def get_config():
  config = base_config()
  config.data.source = "generated:shapes"
  config.data.image_size = 32
  config.data.generated_per_class = 500
  config.model.widths = (16, 32, 64)
  config.model.dropout = 0.1
  config.batch_size = 32
  config.optim.learning_rate = 0.02
  config.train.log_every_steps = 5
  return config
