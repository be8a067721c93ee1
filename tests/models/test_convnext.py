"""ConvNeXt: timm's parameter count, the layers where a near miss would hide, a training
step on 8 devices.

A whole ConvNeXt-T against PyTorch (tests/pretrained/test_published.py) is compared to a
bound for 82 layers, and an approximate GELU (tanh instead of erf: 3e-5 norm-wise at the
logits) or another LayerNorm epsilon would pass it. So those layers are checked here
alone, on inputs where the difference is large against a one- or two-layer bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls.models import create_model
from jaxcls.models.convnext import Mlp, _layer_norm
from model_utils import check_synchronised_step, model_config
from numerics import agreement, assert_normwise_close


def test_convnext_tiny_has_timms_parameter_count():
  model = create_model(model_config("convnext_tiny").model, 1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == 28_589_128
  assert set(shapes) == {"params"}  # No batch norm, so no batch_stats.


def test_mlp_is_pytorchs_linear_exact_gelu_linear():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  fc1, fc2 = torch.nn.Linear(96, 384), torch.nn.Linear(384, 96)
  x = np.random.default_rng(0).normal(0.0, 2.0, (8, 96)).astype(np.float32)
  with torch.no_grad():
    expected = fc2(torch.nn.functional.gelu(fc1(torch.from_numpy(x)))).numpy()
  params = {name: {"kernel": layer.weight.detach().numpy().T,
                   "bias": layer.bias.detach().numpy()}
            for name, layer in (("fc1", fc1), ("fc2", fc2))}
  got = Mlp(384).apply({"params": params}, x)
  # Two linear layers, the longest sum 384 terms (the GELU is elementwise).
  assert_normwise_close(got, expected, agreement(2, 384), "MLP")


def test_layer_norm_has_pytorchs_epsilon():
  torch = pytest.importorskip("torch")
  # Variance 1e-6, the size of epsilon: another epsilon changes the output by tens of
  # percent. The mean is 0, so the normalization is well conditioned.
  x = np.random.default_rng(1).normal(0.0, 1e-3, (4, 5, 5, 96)).astype(np.float32)
  expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (96,), eps=1e-6).numpy()
  norm = _layer_norm("norm", jnp.float32)
  got = norm.apply(norm.init(jax.random.key(0), x), x)
  assert_normwise_close(got, expected, agreement(1, 96), "LayerNorm")


@pytest.mark.slow  # Compiling a ConvNeXt-T training step: most of a minute of CPU.
def test_convnext_trains_a_synchronised_step_on_8_devices():
  check_synchronised_step("convnext_tiny")
