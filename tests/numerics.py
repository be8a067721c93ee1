"""Tolerances argued from float32 rounding, for comparing two computations of one thing.

Two float32 programs that compute the same function with different kernels or summation
orders (oneDNN against XLA, 8 devices against 1) differ by their rounding errors alone,
if the function is well conditioned where it is evaluated. The model used here:

- a float32 sum of n terms, in any order, is off by about sqrt(n)·u of the sum of the
  terms' magnitudes (u = 2^-24; each rounding an independent error; Higham, *Accuracy and
  Stability of Numerical Algorithms*, §2.8 and §3.1). Three times that covers every order
  a kernel may choose with room to spare;
- a network's layers add their errors, when each layer is well conditioned (it does not
  amplify relative errors by much), so `depth` layers give `depth` times that;
- two such computations are each that far from the exact result, so they are at most
  twice that far from each other.

Comparisons are norm-wise (‖a − b‖ / ‖b‖ per array): element-wise, a tiny entry of a sum
that cancels carries a large relative error in any order of summation. Where a
computation is not well conditioned (a gradient through batch norm over a handful of
values, or across many ReLU and max-pool kinks), no such bound holds, and the tests
compare quantities before that step instead.
"""

import math

import jax
import numpy as np

U = 2.0 ** -24  # float32 unit roundoff.


def agreement(depth: int, longest_reduction: int) -> float:
  """How far apart, norm-wise, two float32 computations of a `depth`-layer function whose
  longest sum has `longest_reduction` terms may come out (see the module docstring)."""
  return 2 * 3 * depth * math.sqrt(longest_reduction) * U


def normwise_error(actual, expected) -> float:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = np.linalg.norm(expected)
  return float(np.linalg.norm(actual - expected) / scale) if scale else float(
      np.linalg.norm(actual))


def assert_normwise_close(actual, expected, tolerance: float, what: str = "") -> None:
  """Every array of `actual` within `tolerance` of `expected`'s, norm-wise."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_e, f"{what}: different structures"
  worst = max(((normwise_error(a, e), jax.tree_util.keystr(path))
               for (path, a), (_, e) in zip(flat_a, flat_e)), default=(0.0, ""))
  assert worst[0] <= tolerance, (f"{what}: norm-wise error {worst[0]:.2e} at {worst[1]} "
                                 f"is over the float32 bound {tolerance:.2e}")


# The tiny CNN the tests train (conftest.tiny_config: widths (8, 16), 16 px, batch 16):
# 4 convolutions and the head; its longest sums are the first layer's batch statistics
# and weight gradient, over 16 images × 16 × 16 pixels.
TINY_CNN_LAYERS = 5
TINY_CNN_LONGEST = 16 * 16 * 16
# Inference of that model: its longest sum is a 3×3×16 convolution.
TINY_CNN_FORWARD = agreement(TINY_CNN_LAYERS, 3 * 3 * 16)


def tiny_cnn_training(steps: int) -> float:
  """Two trainings of the tiny CNN for `steps` steps whose sums run in other orders
  (other device counts or collectives): each step's update is float32-close, forward and
  backward, and `steps` well-conditioned SGD steps add their differences up."""
  return steps * agreement(2 * TINY_CNN_LAYERS, TINY_CNN_LONGEST)


def displacement(final, start):
  """final − start, leaf by leaf, in float64: what training changed."""
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                      final, start)


def per_image_logit_bound(logits: np.ndarray, relative: float = TINY_CNN_FORWARD):
  """How far apart the logits of one image may come out of two computations of a model
  whose forward pass agrees to `relative` norm-wise."""
  return relative * np.linalg.norm(np.asarray(logits, np.float64), axis=-1)


def mean_loss_bound(logits: np.ndarray, losses: np.ndarray,
                    relative: float = TINY_CNN_FORWARD) -> float:
  """Bound on the difference of two mean cross-entropies over the same images: twice
  each image's logit bound (logsumexp(z) − z_y moves by at most twice a logit's change),
  the cross-entropy's own float32 evaluation (a few roundings of terms as large as the
  logits and the loss), and the float32 mean."""
  logits, losses = np.asarray(logits, np.float64), np.asarray(losses, np.float64)
  own = 3 * U * (np.abs(losses) + 2 * np.abs(logits).max(axis=-1) + 1)
  per_image = 2 * per_image_logit_bound(logits, relative) + own
  return float(np.mean(per_image) + agreement(1, len(losses)) * np.mean(np.abs(losses)))


def ambiguous_argmax(logits: np.ndarray, relative: float = TINY_CNN_FORWARD) -> np.ndarray:
  """Images whose top two logits are too close for two computations to agree on the
  argmax for sure; everywhere else the predictions must be equal."""
  top2 = np.sort(np.asarray(logits, np.float64), axis=-1)[:, -2:]
  return (top2[:, 1] - top2[:, 0]) <= 2 * per_image_logit_bound(logits, relative)
