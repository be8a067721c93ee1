"""Your own backbone in your own recipe file: plain flax, registered by name.

    python run_train.py --config examples/my_model.py --workdir /tmp/my_model
    jaxcls-predict --workdir /tmp/my_model /tmp/my_model/generated_shapes/disc/disc_0000.jpg
    jaxcls-benchmark step --config examples/my_model.py   # "cpu_fast_convolutions": true

Trains on the demo's generated discs and stripes, 16 px, 2 epochs. jaxcls adds the head
(dropout, `model.num_classes` outputs) on top of the features the backbone returns, and
on CPUs runs its `nn.Conv` and `nn.BatchNorm` with faster kernels without the model
knowing (docs/cpu.md). The run records this file, so every program that loads the
workdir imports it again to build 'tiny_net' (docs/transfer.md). Copy it to start your
own.
"""

import flax.linen as nn
import jax.numpy as jnp

import jaxcls.models
from jaxcls.config import base_config


class TinyNet(nn.Module):
  """Two conv-batch-norm-relu-pool stages, then the mean over the image: features [N, 16]."""
  axis_name: str | None = None  # Batch-norm statistics over every device's batch.
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    for width in (8, 16):
      x = nn.Conv(width, (3, 3), use_bias=False, dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                       axis_name=self.axis_name if train else None)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    return jnp.mean(x, axis=(1, 2))


@jaxcls.models.register("tiny_net")
def tiny_net(model_config, dtype, axis_name):
  """Builds the backbone from the config's `model` section (unused by this one)."""
  del model_config
  return TinyNet(axis_name=axis_name, dtype=dtype)


def get_config():
  config = base_config()
  config.model.name = "tiny_net"
  config.data.source = "generated:shapes"
  config.data.generated_per_class = 64
  config.data.image_size = 16
  config.batch_size = 16
  config.num_epochs = 2
  return config
