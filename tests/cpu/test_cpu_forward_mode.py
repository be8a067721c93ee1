"""Forward-mode differentiation through jaxcls's CPU layers, as through plain flax's:
`jax.jvp` of the training loss and Hessian-vector products (`jax.jvp` of `jax.grad`)
through `steps.apply_model(model)` agree with the same model's plain `apply`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls import cpu, models, steps
from jaxcls.cpu import onednn
from model_utils import model_config, numpy_variables
from numerics import agreement, assert_normwise_close


def _loss(apply, variables, images, labels):
  """The training loss as a function of the parameters (batch statistics of the batch)."""
  def loss(params):
    logits, _ = apply({**variables, "params": params}, images, train=True,
                      mutable=["batch_stats"])
    return steps.loss_fn(logits, labels)
  return loss


def _derivatives(apply, variables, images, labels, direction):
  """(loss, its derivative along `direction`, the Hessian times `direction`), in one
  program: the jvp of the loss (forward mode alone) and of its gradient."""
  loss = _loss(apply, variables, images, labels)
  value, slope = jax.jvp(loss, (variables["params"],), (direction,))
  _, hvp = jax.jvp(jax.grad(loss), (variables["params"],), (direction,))
  return value, slope, hvp


@pytest.mark.parametrize("name, weight_layers, batch, image_size, first_layer_pixels", [
    ("cnn", 5, 16, 16, 16 * 16),
    pytest.param("resnet18", 18, 8, 32, 16 * 16, marks=pytest.mark.slow),  # Stem: /2.
])
def test_jvp_and_hessian_vector_products_are_plain_flax_s(name, weight_layers, batch,
                                                          image_size, first_layer_pixels):
  model = models.create_model(model_config(name).model, 3)
  variables = numpy_variables(model, image_size)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.integers(0, 256, (batch, image_size, image_size, 3)), jnp.uint8)
  labels = jnp.asarray(rng.integers(0, 3, batch), jnp.int32)
  direction = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) / np.sqrt(max(p.size, 1)),
                            jnp.float32), variables["params"])
  args = (variables, images, labels, direction)
  traced = jax.jit(lambda *a: _derivatives(steps.apply_model(model), *a)).trace(*args)
  ours = traced.lower().compile()
  with cpu.disabled():  # flax's layers and XLA's own lowerings, max pooling's included.
    theirs = jax.jit(lambda *a: _derivatives(model.apply, *a)).lower(*args).compile()
  # The CPU layers really ran: jaxcls's convolutions, and its batch norm in the loss.
  assert ("jaxcls_onednn_conv" if onednn.available() else "jaxcls_xla_conv") in str(
      traced.jaxpr)
  forward = jax.make_jaxpr(_loss(steps.apply_model(model), *args[:3]))
  assert "_normalize_train" in str(forward(variables["params"]))
  (our_loss, our_slope, our_hvp), (their_loss, their_slope, their_hvp) = (
      ours(*args), theirs(*args))
  longest = batch * first_layer_pixels  # The first layer's batch statistics and dw.
  # The loss's tangent runs beside the forward pass: twice its layers of rounding. The
  # Hessian-vector product adds the backward pass and its tangent: four times.
  assert abs(our_loss - their_loss) <= agreement(weight_layers, longest) * abs(their_loss)
  assert abs(our_slope - their_slope) <= agreement(2 * weight_layers, longest) * abs(
      their_slope)
  assert_normwise_close(our_hvp, their_hvp, agreement(4 * weight_layers, longest), "hvp")
  assert float(jnp.abs(their_hvp["head"]["kernel"]).max()) > 0
