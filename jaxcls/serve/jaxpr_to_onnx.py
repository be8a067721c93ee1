"""A JAX function → an ONNX graph, one jaxpr equation at a time.

The function is traced with `jax.make_jaxpr` (the batch size symbolic), and every
primitive in the trace becomes one or a few ONNX operators. It works on primitives, not on
layers: any `flax.linen` model whose trace uses only the primitives in `RULES` (dense and
convolution layers, batch, layer and group norm, max and average pooling, the usual
activations, reshapes, concatenation, slicing, softmax, argmax) converts without new code;
one that uses another primitive is refused with its name (`UnsupportedPrimitiveError`).

Layout: JAX's convolutions here are NHWC and ONNX's are NCHW, so every convolution and
pooling is wrapped in transposes; ONNX Runtime's graph optimizer cancels the transposes
between neighbouring layers when it loads the model.

Why not a published converter: `jax2onnx` 0.17.1 (the current release) requires
`orbax-checkpoint<0.11.37`, and jaxcls requires `orbax-checkpoint>=0.12.8`, so the two
cannot be installed together.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
import onnx
from jax.extend import core as jax_core
from onnx import TensorProto, helper, numpy_helper

from jaxcls.errors import JaxclsError

# Opset 21 (ONNX 1.16, IR version 10), older than the newest (28), so that runtimes
# older than the one tested (ONNX Runtime 1.31.1) can load the file too; everything
# used here exists in it.
OPSET = 21
IR_VERSION = 10


class OnnxExportError(JaxclsError, ValueError):
  """The model cannot be written as a valid ONNX graph; the message says why."""


class UnsupportedPrimitiveError(OnnxExportError):
  """The model's trace holds an operation this converter cannot write in ONNX."""


class _Graph:
  """The ONNX graph being written, and which ONNX value holds each jaxpr variable."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self.names: dict = {}  # jaxpr Var → ONNX value name.
    self.dim_sources: list = []  # (symbolic dimension, value name, axis).
    self._count = 0

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def constant(self, value, hint: str = "const", name: str | None = None) -> str:
    name = name or self.fresh(hint)
    self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def ints(self, values: Sequence[int]) -> str:
    return self.constant(np.asarray(list(values), np.int64), "ints")

  def add(self, op: str, inputs: Sequence[str], **attrs) -> str:
    out = self.fresh(op.lower())
    self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
    return out

  def read(self, atom) -> str:
    if isinstance(atom, jax_core.Literal):
      return self.constant(np.asarray(atom.val, atom.aval.dtype), "literal")
    return self.names[atom]

  def bind(self, var, name: str) -> None:
    self.names[var] = name
    for axis, dim in enumerate(getattr(var.aval, "shape", ())):
      if jax.export.is_symbolic_dim(dim):
        self.dim_sources.append((dim, name, axis))

  def dim(self, dim) -> str:
    """An int64 [1] tensor holding `dim`, read off a value that has it when symbolic."""
    if not jax.export.is_symbolic_dim(dim):
      return self.ints([dim])
    for known, name, axis in self.dim_sources:
      if known == dim:
        return self.add("Shape", [name], start=axis, end=axis + 1)
    raise UnsupportedPrimitiveError(
        f"the dimension '{dim}' is computed from the batch size in a way ONNX cannot be "
        "told (no value has it); export with a fixed batch size or reshape with -1.")

  def shape(self, dims: Sequence) -> str:
    if not any(jax.export.is_symbolic_dim(d) for d in dims):
      return self.ints(dims)
    return self.add("Concat", [self.dim(d) for d in dims], axis=0)


Rule = Callable[[_Graph, jax_core.JaxprEqn, list], list]
RULES: dict[str, Rule] = {}


def rule(*names: str):
  def wrap(fn):
    for name in names:
      RULES[name] = fn
    return fn
  return wrap


def _onnx_type(dtype) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def convert_jaxpr(g: _Graph, jaxpr: jax_core.Jaxpr, consts: Sequence,
                  inputs: Sequence[str]) -> list[str]:
  """Writes `jaxpr`'s equations into `g`; returns the names of its outputs."""
  for var, value in zip(jaxpr.constvars, consts):
    g.bind(var, g.constant(np.asarray(value), "const"))
  for var, name in zip(jaxpr.invars, inputs):
    g.bind(var, name)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name not in RULES:
      raise UnsupportedPrimitiveError(
          f"the model uses the JAX operation '{eqn.primitive.name}', which the ONNX "
          f"export cannot write yet; supported: {', '.join(sorted(RULES))}. Export with "
          "jax.export instead (the default --format), or add a rule to "
          "jaxcls/serve/jaxpr_to_onnx.py.")
    outs = RULES[eqn.primitive.name](g, eqn, [g.read(v) for v in eqn.invars])
    for var, name in zip(eqn.outvars, outs):
      g.bind(var, name)
  return [g.read(v) for v in jaxpr.outvars]


def _value_info(name: str, aval, dim_names: dict) -> onnx.ValueInfoProto:
  dims = [dim_names.get(str(d), str(d)) if jax.export.is_symbolic_dim(d) else int(d)
          for d in aval.shape]
  return helper.make_tensor_value_info(name, _onnx_type(aval.dtype), dims)


def convert(fn: Callable, constants, example: jax.ShapeDtypeStruct, *, input_name: str,
            output_names: Sequence[str], dim_names: dict[str, str],
            graph_name: str = "model") -> onnx.ModelProto:
  """`fn(constants, x)` as an ONNX model whose input is `x` and outputs fn's results.

  `constants` (a pytree of arrays: the weights) become initializers named by their path
  (`params/backbone/...`). `example` gives x's shape and dtype, symbolic dimensions
  included (jax.export.symbolic_shape); `dim_names` renames those in the ONNX signature
  ({"batch": "N"}).
  """
  closed = jax.make_jaxpr(fn)(constants, example)
  # The jaxpr's inputs are the constants' leaves in tree_flatten order, then x.
  leaves, _ = jax.tree_util.tree_flatten_with_path(constants)
  g = _Graph()
  names = [g.constant(np.asarray(leaf), name=_path_name(path)) for path, leaf in leaves]
  outs = convert_jaxpr(g, closed.jaxpr, closed.consts, names + [input_name])
  outputs = []
  for out, name, var in zip(outs, output_names, closed.jaxpr.outvars):
    g.nodes.append(helper.make_node("Identity", [out], [name]))
    outputs.append(_value_info(name, var.aval, dim_names))
  # Rules that write an operand another way (max(x, 0) as Relu) leave it unread.
  used = {name for node in g.nodes for name in node.input}
  graph = helper.make_graph(
      g.nodes, graph_name, [_value_info(input_name, closed.jaxpr.invars[-1].aval,
                                        dim_names)],
      outputs, initializer=[t for t in g.initializers if t.name in used])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            ir_version=IR_VERSION, producer_name="jaxcls")
  try:
    onnx.checker.check_model(model, full_check=True)
  except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
    raise OnnxExportError(f"the ONNX graph is not valid: {str(e).strip()}") from None
  return model


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# Inlined: calls of a nested jaxpr (jit, custom derivatives, remat); only their forward
# computation matters here.
@rule("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
      "custom_vjp_call_jaxpr", "remat", "checkpoint")
def _inline(g, eqn, ins):
  sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr")))
  if isinstance(sub, jax_core.ClosedJaxpr):
    return convert_jaxpr(g, sub.jaxpr, sub.consts, ins)
  return convert_jaxpr(g, sub, (), ins)



# Element-wise operations: JAX has already broadcast the operands to one shape (or one
# is a scalar literal), which ONNX's numpy-style broadcasting reads the same way.
_UNARY = {"exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
          "sqrt": "Sqrt", "neg": "Neg", "abs": "Abs", "sign": "Sign", "floor": "Floor",
          "ceil": "Ceil", "erf": "Erf", "sin": "Sin", "cos": "Cos",
          "stop_gradient": "Identity", "copy": "Identity", "copy_p": "Identity",
          "optimization_barrier": "Identity"}
_BINARY = {"add": "Add", "mul": "Mul", "div": "Div", "min": "Min",
           "pow": "Pow", "eq": "Equal", "lt": "Less", "le": "LessOrEqual",
           "gt": "Greater", "ge": "GreaterOrEqual"}


def _register_elementwise():
  for name, op in _UNARY.items():
    rule(name)(lambda g, eqn, ins, op=op: [g.add(op, ins[:1])])
  for name, op in _BINARY.items():
    rule(name)(lambda g, eqn, ins, op=op: [g.add(op, ins)])


_register_elementwise()


def _is_zero_literal(atom) -> bool:
  return (isinstance(atom, jax_core.Literal) and np.ndim(atom.val) == 0
          and float(atom.val) == 0.0)


@rule("max")
def _max(g, eqn, ins):
  # jax.nn.relu is max(x, 0.0): written as Relu, ONNX Runtime fuses it into the
  # convolution before it.
  a, b = eqn.invars
  if _is_zero_literal(b) and np.issubdtype(a.aval.dtype, np.floating):
    return [g.add("Relu", ins[:1])]
  if _is_zero_literal(a) and np.issubdtype(b.aval.dtype, np.floating):
    return [g.add("Relu", ins[1:])]
  return [g.add("Max", ins)]


@rule("and", "or", "xor", "not")
def _logical(g, eqn, ins):
  # On integers JAX's and/or/xor/not are bitwise.
  op = {"and": "And", "or": "Or", "xor": "Xor", "not": "Not"}[eqn.primitive.name]
  if eqn.invars[0].aval.dtype != np.bool_:
    op = "Bitwise" + op
  return [g.add(op, ins)]


@rule("sub")
def _sub(g, eqn, ins):
  # a + (-b) is a - b exactly (negation is exact in IEEE arithmetic). Written so,
  # batch norm's "minus the mean" is an Add, which ONNX Runtime folds into the
  # convolution's bias; it folds no Sub.
  if np.issubdtype(eqn.invars[1].aval.dtype, np.floating):
    return [g.add("Add", [ins[0], g.add("Neg", ins[1:])])]
  return [g.add("Sub", ins)]


@rule("rem")
def _rem(g, eqn, ins):
  # lax.rem takes the dividend's sign, as C's fmod: ONNX's Mod with fmod=1.
  return [g.add("Mod", ins, fmod=1)]


@rule("ne")
def _ne(g, eqn, ins):
  return [g.add("Not", [g.add("Equal", ins)])]


@rule("rsqrt")
def _rsqrt(g, eqn, ins):
  return [g.add("Reciprocal", [g.add("Sqrt", ins)])]


@rule("erfc")
def _erfc(g, eqn, ins):
  # 1 - erf(x): ONNX has no erfc. Absolutely accurate to float32 rounding, not
  # relatively where erfc is tiny (x > 3), which is how gelu(approximate=False) and
  # other activations use it: there the result is multiplied into ~0 anyway.
  one = g.constant(np.ones((), eqn.invars[0].aval.dtype), "one")
  return [g.add("Sub", [one, g.add("Erf", ins)])]


@rule("square")
def _square(g, eqn, ins):
  return [g.add("Mul", [ins[0], ins[0]])]


@rule("integer_pow")
def _integer_pow(g, eqn, ins):
  """x ** y by repeated squaring, as XLA computes it (an exact float Pow may round
  differently)."""
  y, x = eqn.params["y"], ins[0]
  if y == 0:
    one = g.constant(np.ones((), eqn.invars[0].aval.dtype), "one")
    return [g.add("Expand", [one, g.add("Shape", [x])])]
  result, power, n = None, x, abs(y)
  while n:
    if n & 1:
      result = power if result is None else g.add("Mul", [result, power])
    n >>= 1
    if n:
      power = g.add("Mul", [power, power])
  return [g.add("Reciprocal", [result]) if y < 0 else result]


@rule("clamp")
def _clamp(g, eqn, ins):
  low, x, high = ins
  return [g.add("Min", [g.add("Max", [x, low]), high])]


@rule("select_n")
def _select_n(g, eqn, ins):
  if len(ins) != 3 or eqn.invars[0].aval.dtype != np.bool_:
    raise UnsupportedPrimitiveError("select_n with more than two cases (or an integer "
                                    "selector) has no ONNX rule yet.")
  which, if_false, if_true = ins
  return [g.add("Where", [which, if_true, if_false])]


@rule("convert_element_type")
def _convert(g, eqn, ins):
  return [g.add("Cast", ins, to=_onnx_type(eqn.params["new_dtype"]))]


@rule("reshape")
def _reshape(g, eqn, ins):
  if eqn.params.get("dimensions") is not None:
    raise UnsupportedPrimitiveError("reshape with `dimensions` has no ONNX rule.")
  sizes = list(eqn.params["new_sizes"])
  symbolic = [i for i, d in enumerate(sizes) if jax.export.is_symbolic_dim(d)]
  if len(symbolic) == 1:  # The usual case: the batch dimension, inferred by ONNX.
    sizes[symbolic[0]] = -1
    shape = g.ints(sizes)
  else:
    shape = g.shape(sizes)
  return [g.add("Reshape", [ins[0], shape])]


@rule("broadcast_in_dim")
def _broadcast_in_dim(g, eqn, ins):
  target, kept = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  operand = eqn.invars[0].aval.shape
  new_axes = [i for i in range(len(target)) if i not in kept]
  x = g.add("Unsqueeze", [ins[0], g.ints(new_axes)]) if new_axes else ins[0]
  expanded = list(np.ones(len(target), np.int64))
  for axis, size in zip(kept, operand):
    expanded[axis] = size
  if all(_same_dim(a, b) for a, b in zip(expanded, target)):
    return [x]
  # Expand broadcasts numpy-style: 1 keeps a dimension the operand already has.
  wanted = [1 if _same_dim(a, b) else b for a, b in zip(expanded, target)]
  return [g.add("Expand", [x, g.shape(wanted)])]


def _same_dim(a, b) -> bool:
  symbolic = jax.export.is_symbolic_dim(a), jax.export.is_symbolic_dim(b)
  return a == b if symbolic[0] == symbolic[1] else False


@rule("squeeze")
def _squeeze(g, eqn, ins):
  return [g.add("Squeeze", [ins[0], g.ints(eqn.params["dimensions"])])]


@rule("transpose")
def _transpose(g, eqn, ins):
  return [g.add("Transpose", ins, perm=list(eqn.params["permutation"]))]


@rule("concatenate")
def _concatenate(g, eqn, ins):
  return [g.add("Concat", ins, axis=eqn.params["dimension"])]


@rule("stack")
def _stack(g, eqn, ins):
  axis = g.ints([eqn.params["axis"]])
  return [g.add("Concat", [g.add("Unsqueeze", [x, axis]) for x in ins],
                axis=eqn.params["axis"])]


@rule("split")
def _split(g, eqn, ins):
  outs = [g.fresh("split") for _ in eqn.outvars]
  g.nodes.append(helper.make_node("Split", [ins[0], g.ints(eqn.params["sizes"])], outs,
                                  axis=eqn.params["axis"]))
  return outs


@rule("slice")
def _slice(g, eqn, ins):
  starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
  steps = eqn.params["strides"] or [1] * len(starts)
  axes = list(range(len(starts)))
  return [g.add("Slice", [ins[0], g.ints(starts), g.ints(limits), g.ints(axes),
                          g.ints(steps)])]


@rule("rev")
def _rev(g, eqn, ins):
  axes = list(eqn.params["dimensions"])
  last = np.iinfo(np.int64).min  # "Up to the start", counting backwards.
  return [g.add("Slice", [ins[0], g.ints([-1] * len(axes)), g.ints([last] * len(axes)),
                          g.ints(axes), g.ints([-1] * len(axes))])]


@rule("pad")
def _pad(g, eqn, ins):
  config = eqn.params["padding_config"]
  if any(interior or low < 0 or high < 0 for low, high, interior in config):
    raise UnsupportedPrimitiveError("pad with interior or negative padding has no ONNX "
                                    "rule yet.")
  pads = [low for low, _, _ in config] + [high for _, high, _ in config]
  return [g.add("Pad", [ins[0], g.ints(pads), ins[1]], mode="constant")]


def _reduce(op: str):
  def convert_reduce(g, eqn, ins):
    return [g.add(op, [ins[0], g.ints(eqn.params["axes"])], keepdims=0)]
  return convert_reduce


for _name, _op in (("reduce_sum", "ReduceSum"), ("reduce_max", "ReduceMax"),
                   ("reduce_min", "ReduceMin"), ("reduce_prod", "ReduceProd")):
  rule(_name)(_reduce(_op))


def _arg(op: str):
  def convert_arg(g, eqn, ins):
    axis, = eqn.params["axes"]
    # select_last_index=0: the first of equal values, as jnp.argmax takes.
    index = g.add(op, ins, axis=axis, keepdims=0, select_last_index=0)
    return [g.add("Cast", [index], to=_onnx_type(eqn.params["index_dtype"]))]
  return convert_arg


rule("argmax")(_arg("ArgMax"))
rule("argmin")(_arg("ArgMin"))


@rule("dot_general")
def _dot_general(g, eqn, ins):
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval for v in eqn.invars)
  if (not lhs_batch and rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,)
      and tuple(rhs_contract) == (0,)):
    return [g.add("MatMul", ins)]  # A dense layer: x[..., K] @ W[K, M].
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  lhs_idx = [next(letters) for _ in range(lhs.ndim)]
  rhs_idx = [next(letters) for _ in range(rhs.ndim)]
  for l, r in zip((*lhs_contract, *lhs_batch), (*rhs_contract, *rhs_batch)):
    rhs_idx[r] = lhs_idx[l]
  free_l = [lhs_idx[i] for i in range(lhs.ndim) if i not in (*lhs_contract, *lhs_batch)]
  free_r = [rhs_idx[i] for i in range(rhs.ndim) if i not in (*rhs_contract, *rhs_batch)]
  out = [lhs_idx[i] for i in lhs_batch] + free_l + free_r
  equation = f"{''.join(lhs_idx)},{''.join(rhs_idx)}->{''.join(out)}"
  return [g.add("Einsum", ins, equation=equation)]


def _inverse(perm: Sequence[int]) -> list[int]:
  return [int(i) for i in np.argsort(perm)]


@rule("conv_general_dilated")
def _conv(g, eqn, ins):
  p = eqn.params
  if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
    raise UnsupportedPrimitiveError("a transposed (input-dilated) or batch-grouped "
                                    "convolution has no ONNX rule yet.")
  pads = p["padding"]
  if any(low < 0 or high < 0 for low, high in pads):
    raise UnsupportedPrimitiveError("a convolution with negative padding has no ONNX "
                                    "rule yet.")
  numbers = p["dimension_numbers"]
  # lhs_spec lists (batch, feature, spatial...) axes: transposing by it gives NCHW;
  # rhs_spec (out feature, in feature, spatial...) gives OIHW.
  x = g.add("Transpose", [ins[0]], perm=list(numbers.lhs_spec))
  kernel = g.add("Transpose", [ins[1]], perm=list(numbers.rhs_spec))
  y = g.add("Conv", [x, kernel], strides=list(p["window_strides"]),
            dilations=list(p["rhs_dilation"]), group=p["feature_group_count"],
            pads=[low for low, _ in pads] + [high for _, high in pads])
  return [g.add("Transpose", [y], perm=_inverse(numbers.out_spec))]


def _pool_layout(eqn) -> tuple[list[int], list[int]]:
  """(the axes not pooled, the pooled axes) of a reduce_window; ONNX pools need the
  first two (batch, channels) and pool the rest."""
  p = eqn.params
  if any(d != 1 for d in p["base_dilation"]):
    raise UnsupportedPrimitiveError("a pooling with base dilation has no ONNX rule.")
  pooled = [i for i, (w, s, pad, d) in enumerate(zip(
      p["window_dimensions"], p["window_strides"], p["padding"], p["window_dilation"]))
      if (w, s, tuple(pad), d) != (1, 1, (0, 0), 1)]
  kept = [i for i in range(len(p["window_dimensions"])) if i not in pooled]
  if len(kept) != 2 or not pooled:
    raise UnsupportedPrimitiveError(
        f"a pooling window {p['window_dimensions']} that leaves {len(kept)} axes "
        "unpooled; ONNX pools every axis but batch and channels.")
  return kept, pooled


def _pool(g, eqn, ins, op: str, **attrs) -> str:
  kept, pooled = _pool_layout(eqn)
  p = eqn.params
  perm = kept + pooled
  x = g.add("Transpose", ins[:1], perm=perm)
  y = g.add(op, [x], kernel_shape=[p["window_dimensions"][i] for i in pooled],
            strides=[p["window_strides"][i] for i in pooled],
            dilations=[p["window_dilation"][i] for i in pooled],
            pads=[p["padding"][i][0] for i in pooled]
            + [p["padding"][i][1] for i in pooled],
            **attrs)
  return g.add("Transpose", [y], perm=_inverse(perm))


@rule("reduce_window_max")
def _max_pool(g, eqn, ins):
  # ONNX's MaxPool ignores padding, as lax's padding with -inf does.
  return [_pool(g, eqn, ins, "MaxPool")]


@rule("reduce_window_sum")
def _sum_pool(g, eqn, ins):
  # The window mean with padding counted, times the window's size: the window sum.
  size = int(np.prod(eqn.params["window_dimensions"]))
  mean = _pool(g, eqn, ins, "AveragePool", count_include_pad=1)
  scale = g.constant(np.asarray(size, eqn.invars[0].aval.dtype), "window_size")
  return [g.add("Mul", [mean, scale])]


@rule("iota")
def _iota(g, eqn, ins):
  p = eqn.params
  if any(jax.export.is_symbolic_dim(d) for d in p["shape"]):
    raise UnsupportedPrimitiveError("an iota whose shape depends on the batch size has "
                                    "no ONNX rule yet.")
  line = np.arange(p["shape"][p["dimension"]], dtype=p["dtype"])
  axes = [i for i in range(len(p["shape"])) if i != p["dimension"]]
  return [g.constant(np.broadcast_to(np.expand_dims(line, axes), p["shape"]), "iota")]


@rule("dim_as_value")
def _dim_as_value(g, eqn, ins):
  scalar = g.add("Reshape", [g.dim(eqn.params["dim"]), g.ints([])])
  return [g.add("Cast", [scalar], to=_onnx_type(eqn.outvars[0].aval.dtype))]


@rule("gather")
def _gather(g, eqn, ins):
  """The two gathers NumPy-style indexing makes with a symbolic batch size: whole
  entries along one axis (`x[:, 0]`, `x[:, ::-1]`: ONNX Gather) and one slice along
  one axis (`x[:n]`: ONNX Slice)."""
  numbers, p = eqn.params["dimension_numbers"], eqn.params
  operand, indices = (v.aval for v in eqn.invars)
  sizes = p["slice_sizes"]
  if (len(numbers.start_index_map) != 1 or numbers.operand_batching_dims
      or indices.shape[-1:] != (1,)
      or p["mode"] != jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS):
    raise UnsupportedPrimitiveError(f"gather {numbers} has no ONNX rule yet; only "
                                    "indexing along one axis has.")
  axis, = numbers.start_index_map
  whole = all(_same_dim(s, d) for i, (s, d) in enumerate(zip(sizes, operand.shape))
              if i != axis)
  index_dims = len(indices.shape) - 1
  taken = [d for d in range(len(eqn.outvars[0].aval.shape))
           if d not in numbers.offset_dims]
  if whole and tuple(numbers.collapsed_slice_dims) == (axis,) and sizes[axis] == 1 and (
      taken == list(range(axis, axis + index_dims))):
    index = g.add("Reshape", [ins[1], g.ints(indices.shape[:-1])])
    return [g.add("Gather", [ins[0], index], axis=axis)]
  if whole and not numbers.collapsed_slice_dims and indices.shape == (1,):
    start = g.add("Cast", [ins[1]], to=TensorProto.INT64)
    end = g.add("Add", [start, g.dim(sizes[axis])])
    return [g.add("Slice", [ins[0], start, end, g.ints([axis])])]
  raise UnsupportedPrimitiveError(f"gather {numbers} with slice sizes {sizes} has no "
                                  "ONNX rule yet; only indexing along one axis has.")
