"""ResNet-18's convolutions one by one: XLA:CPU's, jaxcls's (oneDNN) and PyTorch's.

    jaxcls-benchmark conv-kernels [--batch-size 32] [--image-size 128] [--rounds 11]

For each convolution shape of ResNet-18 (stem, the 3×3 and strided 3×3 and 1×1
convolutions of each stage), times the forward pass and the backward pass (input and
weight gradients; weight only for the stem, whose input needs none) as separate jitted
programs three ways: `lax.conv_general_dilated` (XLA:CPU's Eigen kernels), jaxcls's
convolution (oneDNN's kernels through XLA FFI, what the models run on CPU; left out
where `jaxcls.cpu.onednn` is unavailable), and PyTorch eager with channels-last
tensors. Prints a table, then one JSON line with the per-step totals (each shape
weighted by how often the network runs it). Each side's programs are all timed before
the next side's, since OpenMP threads keep spinning for a while after a call; the two
programs of a shape are timed in turn, round after round, after 3 untimed calls each.
The question it answers: how much of the gap between train steps lies in the
convolution kernels themselves. Needs torch; not a dependency of jaxcls.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax
import torch

from jaxcls.cpu import conv, onednn
from jaxcls.cli import common

# (name, input side as a fraction of the image side, in, out, kernel, stride, count)
SHAPES = [
    ("stem 7x7/2", 1, 3, 64, 7, 2, 1),
    ("layer1 3x3", 1 / 4, 64, 64, 3, 1, 4),
    ("layer2 3x3/2", 1 / 4, 64, 128, 3, 2, 1),
    ("layer2 1x1/2", 1 / 4, 64, 128, 1, 2, 1),
    ("layer2 3x3", 1 / 8, 128, 128, 3, 1, 3),
    ("layer3 3x3/2", 1 / 8, 128, 256, 3, 2, 1),
    ("layer3 1x1/2", 1 / 8, 128, 256, 1, 2, 1),
    ("layer3 3x3", 1 / 16, 256, 256, 3, 1, 3),
    ("layer4 3x3/2", 1 / 16, 256, 512, 3, 2, 1),
    ("layer4 1x1/2", 1 / 16, 256, 512, 1, 2, 1),
    ("layer4 3x3", 1 / 32, 512, 512, 3, 1, 3),
]


def _xla(x, w, dy, stride, pad, input_grad, conv_general_dilated=lax.conv_general_dilated):
  def conv(a, b):
    return conv_general_dilated(a, b, (stride, stride), ((pad, pad), (pad, pad)),
                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def backward(a, b, g):
    grads = jax.vjp(conv, a, b)[1](g)
    return grads if input_grad else grads[1]

  forward, backward = jax.jit(conv), jax.jit(backward)
  x, w, dy = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
  return (lambda: jax.block_until_ready(forward(x, w)),
          lambda: jax.block_until_ready(backward(x, w, dy)))


def _torch(x, w, dy, stride, pad, input_grad):
  nchw = lambda a: torch.from_numpy(a.copy()).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  xt = nchw(x).requires_grad_(input_grad)
  wt = torch.from_numpy(w.copy()).permute(3, 2, 0, 1).contiguous(
      memory_format=torch.channels_last).requires_grad_(True)
  gt = nchw(dy)
  conv = lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad)

  def forward():
    with torch.no_grad():
      conv()

  def forward_backward():
    torch.autograd.grad(conv(), [xt, wt] if input_grad else [wt], gt)

  return forward, forward_backward


def _interleaved_medians(fns, rounds: int, warmup: int = 3) -> list[float]:
  """Median ms of each function, timed in turn round after round (drift hits all alike)."""
  for fn in fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in fns]
  for _ in range(rounds):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(1000 * (time.perf_counter() - start))
  return [statistics.median(t) for t in times]


def main(argv=None) -> int:
  parser = common.Parser(prog="jaxcls-benchmark conv-kernels",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=11)
  parser.add_argument("--threads", type=int, default=None,
                      help="PyTorch threads (default: its own choice).")
  args = parser.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  cases = []
  for name, side, cin, cout, k, stride, count in SHAPES:
    size = max(1, round(args.image_size * side))
    pad = k // 2
    out = (size + 2 * pad - k) // stride + 1
    x = rng.standard_normal((args.batch_size, size, size, cin), np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    dy = rng.standard_normal((args.batch_size, out, out, cout), np.float32)
    cases.append((name, count, (x, w, dy, stride, pad, not name.startswith("stem"))))
  # All of XLA first, then jaxcls's (oneDNN), then PyTorch's: OpenMP threads (oneDNN's,
  # PyTorch's) keep spinning for a while after each call and would slow the others if
  # they were interleaved.
  sides = {"xla": [_interleaved_medians(_xla(*case), args.rounds) for _, _, case in cases]}
  if onednn.available():
    sides["jaxcls"] = [_interleaved_medians(
        _xla(*case, conv_general_dilated=conv.conv_general_dilated), args.rounds)
        for _, _, case in cases]
  sides["pytorch"] = []
  for _, _, case in cases:
    forward, forward_backward = _interleaved_medians(_torch(*case), args.rounds)
    # Autograd needs its own forward pass: PyTorch's backward alone is the difference.
    sides["pytorch"].append((forward, forward_backward - forward))
  labels = {"xla": "XLA", "jaxcls": "jaxcls (oneDNN)", "pytorch": "PyTorch"}
  print(f"{'convolution':14s} {'runs':>4s} " + " ".join(
      f"{labels[side] + ' fwd':>20s} {'bwd':>7s}" for side in sides) + "  (ms)")
  totals = {f"{side}_ms": 0.0 for side in sides}
  rows = []
  for i, (name, count, _) in enumerate(cases):
    row = {"convolution": name, "runs_per_step": count}
    for side, times in sides.items():
      totals[f"{side}_ms"] += count * sum(times[i])
      row[f"{side}_forward_ms"], row[f"{side}_backward_ms"] = times[i]
    rows.append(row)
    print(f"{name:14s} {count:4d} " + " ".join(
        f"{times[i][0]:20.2f} {times[i][1]:7.2f}" for times in sides.values()))
  result = {"batch_size": args.batch_size, "image_size": args.image_size,
            "torch_threads": torch.get_num_threads(),
            **{k: round(v, 1) for k, v in totals.items()},
            "ratio_xla_over_pytorch": round(totals["xla_ms"] / totals["pytorch_ms"], 2)}
  if "jaxcls" in sides:
    result["ratio_jaxcls_over_pytorch"] = round(totals["jaxcls_ms"] / totals["pytorch_ms"], 2)
  result["shapes"] = rows
  print(json.dumps(result))
  return 0
