"""jaxpr_to_onnx rule by rule: small functions with a symbolic batch size, run in ONNX
Runtime and in JAX, on several batch sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls.serve import jaxpr_to_onnx, onnx_export
from numerics import agreement, assert_normwise_close

WEIGHTS = {"w": np.linspace(-1.0, 1.0, 6 * 5, dtype=np.float32).reshape(6, 5),
           "kernel": np.linspace(-0.5, 0.5, 3 * 3 * 2 * 4,
                                 dtype=np.float32).reshape(3, 3, 2, 4)}

# Each function: (weights, x float32 [batch, 4, 6]) → one array. Every result is a sum
# of at most 24 float32 terms or a few element-wise roundings: norm-wise within
# agreement(2, 24) of JAX's, or exactly equal for integers and booleans.
FUNCTIONS = {
    "pad": lambda w, x: jnp.pad(x, ((0, 0), (1, 2), (0, 1)), constant_values=0.5),
    "split": lambda w, x: jnp.split(x, [2], axis=1)[1] * 2,
    "clip": lambda w, x: jnp.clip(x, -0.5, 0.5),
    "where": lambda w, x: jnp.where(x > 0, x, 2 * x),
    "logical": lambda w, x: ((x > 0) & (x < 0.5)) | ~(x != 0.25),
    "compare": lambda w, x: (x >= 0.1) ^ (x <= -0.1) ^ (x < 0.3) ^ (x == 0),
    "flip": lambda w, x: x[:, ::-1] - x[:, :, ::-1],
    "take": lambda w, x: x[:, 0] * x[:, -1],
    "halves": lambda w, x: jnp.concatenate([x, 2 * x])[:x.shape[0]] + jnp.concatenate(
        [x, 2 * x])[x.shape[0]:],
    "dense": lambda w, x: x @ w["w"],
    "batched_matmul": lambda w, x: jnp.einsum("bij,bkj->bik", x, x),
    "contract_middle": lambda w, x: jnp.einsum("bij,ik->bkj", x, w["w"][:4]),
    "reductions": lambda w, x: x.min(axis=2) + x.max(axis=1).sum() + jnp.prod(x, axis=1)[
        :, :4],
    "arg": lambda w, x: jnp.argmin(x, axis=2) * 10 + jnp.argmax(x, axis=1)[:, :4],
    "powers": lambda w, x: (x + 2) ** -2 + x ** 3 + x ** 0,
    "shapes": lambda w, x: jnp.transpose(jnp.squeeze(x[:, :1], 1)[:, None], (0, 2, 1)),
    "unary": lambda w, x: (jnp.abs(x) + jnp.sign(x) + jnp.floor(x * 3) + jnp.ceil(x * 3)
                           + jnp.exp(x) + jnp.log(jnp.abs(x) + 1) + jnp.sqrt(jnp.abs(x))
                           + jnp.sin(x) + jnp.cos(x) + jax.scipy.special.erfc(x)
                           + jnp.tanh(x) + jax.nn.sigmoid(x) + jax.lax.rsqrt(x * x + 1)),
    "integers": lambda w, x: ((x * 10).astype(jnp.int32) * 3 // 2) % 4 ^ 5,
    "broadcast_batch": lambda w, x: (jnp.zeros_like(x)
                                     + jnp.ones(x.shape[0])[:, None, None]),
    "reshape_batch": lambda w, x: jnp.concatenate([x, x]).reshape((2, -1, 24)).sum(0),
    "iota": lambda w, x: x + jnp.arange(6, dtype=jnp.float32),
    "relu": lambda w, x: jax.nn.relu(x) + jnp.maximum(0.0, -x),
    "softmax": lambda w, x: jax.nn.softmax(x * 4, axis=-1),
    "pools": lambda w, x: (nn.avg_pool(x[..., None], (2, 3), strides=(2, 2),
                                       padding="SAME")[..., 0]
                           + nn.max_pool(x[..., None], (3, 2), (2, 2),
                                         padding="SAME")[..., 0]),
    "dilated_conv": lambda w, x: nn.Conv(4, (3, 3), kernel_dilation=2, padding="SAME",
                                         use_bias=False).apply(
        {"params": {"kernel": w["kernel"]}}, jnp.stack([x, -x], -1)),
    "nchw_conv": lambda w, x: jax.lax.conv_general_dilated(
        jnp.stack([x, x * x], 1), jnp.transpose(w["kernel"], (3, 2, 0, 1)), (1, 2),
        ((1, 1), (0, 2)), dimension_numbers=("NCHW", "OIHW", "NCHW")),
}


def _model(fn):
  batch, = jax.export.symbolic_shape("batch")
  example = jax.ShapeDtypeStruct((batch, 4, 6), jnp.float32)
  return jaxpr_to_onnx.convert(lambda w, x: (fn(w, x),), WEIGHTS, example,
                               input_name="x", output_names=("y",),
                               dim_names={"batch": "N"})


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_rule_matches_jax(name):
  fn = FUNCTIONS[name]
  session = onnx_export.session(_model(fn))
  for n in (1, 3):
    x = np.random.default_rng(n).uniform(-1, 1, (n, 4, 6)).astype(np.float32)
    x[0, 0, 0] = 0.25  # Exercise the == and != branches.
    expected = np.asarray(jax.jit(fn)(WEIGHTS, x))
    actual, = session.run(["y"], {"x": x})
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    if np.issubdtype(expected.dtype, np.floating):
      assert_normwise_close(actual, expected, agreement(2, 24), name)
    else:
      np.testing.assert_array_equal(actual, expected, err_msg=name)


def test_signature_names_the_batch_dimension():
  model = _model(FUNCTIONS["dense"])
  dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
  assert dims(model.graph.input[0]) == ["N", 4, 6]
  assert dims(model.graph.output[0]) == ["N", 4, 5]
  assert {t.name for t in model.graph.initializer} >= {"w"}
