"""Each ResNet trains one step on 8 devices with synchronised batch norm.

Kept apart from test_models.py: compiling a ResNet training step takes 20-30 s of CPU
time each on a small machine. One network per block kind: ResNet-34 is ResNet-18's basic
block repeated, so its step would check nothing ResNet-18's does not.
"""

import pytest

from model_utils import check_synchronised_step

pytestmark = pytest.mark.slow  # Trains, or runs programs: the full lane only.


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_trains_a_synchronised_step_on_8_devices(name):
  check_synchronised_step(name)
