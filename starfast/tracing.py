"""Permutation specs derived from a model's graph: ``trace_spec(model, example_input)``.

The graph comes from ``torch.export.export`` (non-strict mode), not ``torch.fx.symbolic_trace``:
symbolic tracing runs ``forward`` on proxies and fails on the control flow, proxy iteration and
item assignment of real models (all four Hugging Face models of the tests), while export runs
``forward`` on fake tensors with real shapes, so Python control flow on shapes just runs, and
records ATen ops that keep their meaning (``linear``, ``conv2d``, ``batch_norm``,
``layer_norm``, ``scaled_dot_product_attention``…) with each op's module path.

The tracer labels every dimension of every tensor in the graph with the units it carries: a
dimension is a product of *factors* (row-major), each one of

- fixed: positions no permutation may move (batch, tokens, pixels, the model's input features,
  tensors made inside ``forward``);
- a *space*: permutable units. Every axis of a parameter or buffer starts as its own space; an
  op that needs two axes permuted alike (a Linear's input axis and the features it reads; the
  two sides of a residual addition; a BatchNorm's statistics and its channels) *unites* their
  spaces (union-find). Concatenation makes a space whose *parts* are the inputs' spaces, and a
  space can be *refined* into parts (a DenseNet BatchNorm over a concatenation, the heads of an
  attention projection, a GroupNorm's groups), every member of its class alike;
- *within-head* units: a space split by a reshape into heads ``[.., heads, head_dim]``; the head
  axis is a fixed space and each head's ``head_dim`` units are one part, so ``q·k`` and ``attn·v``
  unite query part ``h`` with key part ``h`` (and value part ``h`` with the output projection's
  input block ``h``), as the zoo's ViT spec does.

A space meeting a fixed factor is *pinned* (left unpermuted), with the node and the reason:
ops the tracer does not know pin every space they touch, so what it cannot prove safe is never
permuted. The model's inputs and outputs are fixed. Pins at the model's boundary (its inputs and
outputs, embedding rows indexed by token ids, kernel taps, whole attention heads) are expected;
any other pin is recorded in :attr:`TracedSpec.left_out` (``strict=True`` makes it an error).
Every unpinned class of size > 1 becomes a :class:`~starfast.spec.Group` of the axes in it, with
:class:`~starfast.spec.Site`\\ s where its units can be observed: the inputs of the Linear/Conv
modules consuming them, else the output of the last module producing them.
"""
from __future__ import annotations

import linecache
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from starfast.spec import Axis, Group, PermutationSpec, Site


class TraceError(ValueError):
    """The model could not be traced, or (``strict=True``) some axis had to be left unpermuted."""


@dataclass(frozen=True)
class LeftOut:
    """Axes the tracer left unpermuted for a reason other than the model's boundary."""

    size: int
    axes: Tuple[Axis, ...]
    nodes: Tuple[str, ...]  # graph nodes that pinned them
    reasons: Tuple[str, ...]

    def describe(self) -> str:
        tensors = sorted({axis.name for axis in self.axes})
        shown = ", ".join(tensors[:4]) + (f" (+{len(tensors) - 4} more)" if len(tensors) > 4 else "")
        return f"{self.size} units of {shown}: " + "; ".join(f"{node}: {why}" for node, why in zip(self.nodes, self.reasons))


class TracedSpec(PermutationSpec):
    """A :class:`PermutationSpec` found by :func:`trace_spec`, which also says what it left out."""

    def __init__(self, groups: Sequence[Group], left_out: Sequence[LeftOut] = ()):
        super().__init__(groups)
        self.left_out: Tuple[LeftOut, ...] = tuple(left_out)


def trace_spec(model: nn.Module, example_input, *, strict: bool = False) -> TracedSpec:
    """The permutation spec of ``model``, derived from its graph on ``example_input``.

    ``example_input``: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs
    (e.g. ``input_ids`` of a text model). The model is traced in eval mode (its mode is restored).
    ``strict=True`` raises :class:`TraceError` when an axis had to be left unpermuted for a reason
    other than the model's boundary; otherwise those axes are listed in ``spec.left_out``.
    """
    program = export_graph(model, example_input)
    spec = _Tracer(model, program).run()
    if strict and spec.left_out:
        listed = "\n".join(f"  - {entry.describe()}" for entry in spec.left_out)
        raise TraceError(f"trace_spec(strict=True): {len(spec.left_out)} set(s) of axes could not be proven permutable:\n{listed}")
    return spec


def export_graph(model: nn.Module, example_input) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model`` in eval mode, with one clear error when it fails."""
    args, kwargs = example_arguments(example_input)
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as error:  # export raises many types; all mean "this model cannot be traced"
        raise TraceError(
            f"trace_spec: torch.export could not trace {type(model).__name__} ({_construct(error)}). "
            "Make forward traceable at that construct (no Python branching on tensor values, no .item()/.tolist() "
            "feeding control flow), or give the model a hand-written spec: a permutation_spec() method returning a "
            "starfast.PermutationSpec"
        ) from error
    finally:
        model.train(was_training)


def _construct(error: Exception) -> str:
    """Export's complaint in one line, with the user's source line it stopped at when it says."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    complaint = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
    frames = [m for m in re.finditer(r'File "([^"]+)", line (\d+), in (\w+)', text) if "site-packages" not in m.group(1)]
    if not frames:
        return complaint
    path, line, function = frames[-1].groups()
    code = linecache.getline(path, int(line)).strip()
    return f"{complaint} at {path}:{line} in {function}" + (f": `{code}`" if code else "")


def example_arguments(example_input) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` for a forward call on ``example_input`` (tensor, tuple/list or dict)."""
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    raise TypeError(
        f"example_input must be a tensor, a tuple of positional inputs or a dict of keyword inputs, got {type(example_input).__name__}"
    )


# -- factors -----------------------------------------------------------------------------------
# A dimension's label is a tuple of factors (size-1 factors dropped):
#   ("F", size, why)   fixed; why is None at the model's boundary, else why it is fixed
#   ("S", space)       permutable units (a union-find space)
#   ("W", record)      within-head units of a head split (record index into _Tracer.heads)

Factor = tuple
Label = Tuple[Factor, ...]


class _Spaces:
    """Union-find of unit spaces, with refinement into parts and pins."""

    def __init__(self):
        self.parent: List[int] = []
        self.size: List[int] = []
        self.parts: Dict[int, List[int]] = {}  # root -> child spaces, in order
        self.pins: Dict[int, List[Tuple[str, str, bool]]] = {}  # root -> (node, reason, at boundary)

    def new(self, size: int, pins=()) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        if pins:
            self.pins[len(self.parent) - 1] = list(pins)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        root = space
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[space] != root:
            self.parent[space], space = root, self.parent[space]
        return root

    def leaves(self, space: int) -> List[int]:
        root = self.find(space)
        children = self.parts.get(root)
        if children is None:
            return [root]
        return [leaf for child in children for leaf in self.leaves(child)]

    def made_of(self, parts: Sequence[int]) -> int:
        """A new space whose units are ``parts`` one after the other."""
        space = self.new(sum(self.size[self.find(part)] for part in parts))
        self.parts[space] = list(parts)
        return space

    def refine(self, space: int, cuts) -> None:
        """Split the leaves of ``space`` so every offset in ``cuts`` is a boundary between leaves."""
        offset = 0
        for leaf in self.leaves(space):
            size = self.size[leaf]
            inner = sorted({cut - offset for cut in cuts if offset < cut < offset + size})
            if inner:
                bounds = [0] + inner + [size]
                inherited = self.pins.get(leaf, ())
                self.parts[leaf] = [self.new(stop - start, inherited) for start, stop in zip(bounds, bounds[1:])]
            offset += size

    def split(self, space: int, count: int) -> List[int]:
        """``count`` equal consecutive parts of ``space`` (refined so each is a union of leaves)."""
        part = self.size[self.find(space)] // count
        self.refine(space, range(part, part * count, part))
        return [self.range(space, k * part, part) for k in range(count)]

    def range(self, space: int, start: int, size: int) -> int:
        """A space made of the units ``[start, start + size)`` of ``space``."""
        self.refine(space, (start, start + size))
        offset, chosen = 0, []
        for leaf in self.leaves(space):
            if start <= offset < start + size:
                chosen.append(leaf)
            offset += self.size[leaf]
        return chosen[0] if len(chosen) == 1 else self.made_of(chosen)

    def unite(self, a: int, b: int) -> None:
        cuts = set(_offsets(self, a)) | set(_offsets(self, b))
        self.refine(a, cuts)
        self.refine(b, cuts)
        for x, y in zip(self.leaves(a), self.leaves(b)):
            x, y = self.find(x), self.find(y)
            if x != y:
                self.parent[y] = x
                if y in self.pins:
                    self.pins.setdefault(x, []).extend(self.pins.pop(y))

    def pin(self, space: int, node: str, reason: str, boundary: bool) -> None:
        for leaf in self.leaves(space):
            self.pins.setdefault(leaf, []).append((node, reason, boundary))


def _offsets(spaces: _Spaces, space: int) -> List[int]:
    offsets, offset = [], 0
    for leaf in spaces.leaves(space):
        offset += spaces.size[leaf]
        offsets.append(offset)
    return offsets


def _aten_name(target) -> str:
    packet = getattr(target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(target, "__name__", str(target))


# Ops that act on each element alone, or along a dimension in a way that commutes with permuting
# it (softmax), or that only change dtype/memory: the output dims carry the input dims' units.
_UNARY = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "elu", "elu_", "selu", "celu", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "hardswish", "hardswish_",
    "hardsigmoid", "mish", "softplus", "dropout", "dropout_", "feature_dropout", "alpha_dropout",
    "clone", "contiguous", "detach", "alias", "_to_copy", "to", "lift_fresh_copy", "abs", "neg", "exp", "log",
    "sqrt", "rsqrt", "erf", "reciprocal", "square", "sin", "cos", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "_safe_softmax", "sign", "logical_not", "ones_like", "zeros_like", "full_like", "empty_like",
    "type_as", "bitwise_not",
}
# Elementwise over broadcast tensor operands (scalars ignored).
_ELEMENTWISE = {
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "where", "maximum", "minimum",
    "eq", "ne", "gt", "ge", "lt", "le", "masked_fill", "masked_fill_", "logical_and", "logical_or", "addcmul",
    "addcdiv", "lerp", "bitwise_and", "bitwise_or", "copy_", "floor_divide", "remainder", "atan2", "hypot",
    "pow", "clamp", "clamp_", "clamp_min", "clamp_max", "fill", "fill_",  # their tensor operands broadcast
}
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
             "unsqueeze_", "view_as", "reshape_as"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "var_mean", "logsumexp", "prod"}
_POOLS = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
}
_BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
                "native_batch_norm", "_native_batch_norm_legit", "instance_norm"}
_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_SHAPE_ONLY = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata", "dim",
               "_assert_scalar", "sym_constrain_range_for_size", "_assert_async", "size"}
_CREATORS = {"arange", "zeros", "ones", "full", "empty", "scalar_tensor", "tensor", "new_ones", "new_zeros",
             "new_full", "new_empty", "rand", "randn", "randint", "rand_like", "randn_like", "linspace", "eye", "tril", "triu"}

# Modules whose forward is exactly one op of the graph: their input/output are where units show.
_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PRODUCERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


class _Tracer:
    def __init__(self, model: nn.Module, program):
        self.model = model
        self.program = program
        self.spaces = _Spaces()
        self.heads: List[Tuple[int, List[int]]] = []  # within-head records: (head-axis space, parts)
        self.labels: Dict[Any, Any] = {}  # node -> a list of labels (a tensor), a tuple of those (several outputs), or None
        self.tensor_axes: List[Tuple[str, int, int]] = []  # (state name, dim, space) in graph order
        self.used: Dict[int, bool] = {}
        self.modules: Dict[str, nn.Module] = dict(model.named_modules())
        self.input_sites: List[Tuple[int, int, str, int]] = []  # (leaf space, offset, module, dim) of consumers
        self.output_sites: List[Tuple[int, int, str, int]] = []
        self.calls: Dict[str, set] = {}

    # -- the walk -------------------------------------------------------------------------------

    def run(self) -> TracedSpec:
        signature = self.program.graph_signature
        state = self.model.state_dict(keep_vars=True)
        aliases: Dict[int, List[str]] = {}
        for name, tensor in state.items():
            aliases.setdefault(id(tensor), []).append(name)
        named = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        user_outputs = set(signature.user_outputs)
        nodes = list(self.program.graph.nodes)
        for node in nodes:
            stack = node.meta.get("nn_module_stack") or {}
            for key, (path, _) in stack.items():
                self.calls.setdefault(path, set()).add(key)
        for node in nodes:
            if node.op == "placeholder":
                self.labels[node] = self._placeholder(node, named.get(node.name), state, aliases)
            elif node.op == "call_function":
                self.labels[node] = self._call(node)
            elif node.op == "output":
                for value in node.args[0]:
                    if hasattr(value, "name") and value.name in user_outputs:
                        self._pin_all(self.labels.get(value), value.name, "a model output", boundary=True)
        for name, dim, space in self.tensor_axes:
            if not self.used.get(space):
                self.spaces.pin(space, name, "not used by forward", True)
        return self._spec()

    def _placeholder(self, node, state_name: Optional[str], state, aliases):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        if state_name is None or state_name not in state:
            why = None if node.name in set(self.program.graph_signature.user_inputs) else f"{node.name} is a constant"
            return [((("F", size, why),) if size > 1 else ()) for size in value.shape]
        labels = []
        for dim, size in enumerate(value.shape):
            if size <= 1:
                labels.append(())
                continue
            space = self.spaces.new(size)
            for name in aliases.get(id(state[state_name]), [state_name]):
                self.tensor_axes.append((name, dim, space))
            labels.append((("S", space),))
        return labels

    def _call(self, node):
        """The labels of an op's output. A handler that fails, or whose labels do not fit the
        output, falls back to the unknown-op rule: the unions it made only tie groups together and
        the pins only remove groups, so what it did before failing is still safe."""
        value = node.meta.get("val")
        try:
            labels = self._dispatch(node, value)
            if isinstance(value, torch.Tensor) and (not isinstance(labels, list) or len(labels) != value.dim()):
                raise _Untracked
            return labels
        except Exception as error:  # a tracer bug must cost groups, never the trace
            return self._unknown(node, value, f"the tracer failed on {_aten_name(node.target)} ({type(error).__name__})")

    def _dispatch(self, node, value):
        name = _aten_name(node.target)
        if node.target is operator.getitem:
            source = self.labels.get(node.args[0])
            return source[node.args[1]] if isinstance(source, tuple) else None
        self._mark_used(node)
        if name in _SHAPE_ONLY:
            return None
        if name in _CREATORS:
            return self._fixed(value, f"{node.name} is made inside forward")
        if name in _UNARY:
            return self._arg(node, 0)
        if name in _ELEMENTWISE:
            return self._broadcast(node, [arg for arg in _flat_args(node) if self._is_tensor(arg)], value)
        if name in _RESHAPES:
            return self._reshape(node, self._arg(node, 0), tuple(value.shape))
        if name in _REDUCTIONS:
            return self._reduce(node, value)
        if name in _POOLS:
            return self._pool(node, value)
        if name in _BATCH_NORMS:
            return self._batch_norm(node, value)
        if name in _CONVS:
            return self._conv(node, value)
        handler = getattr(self, f"_op_{name}", None)
        if handler is not None:
            return handler(node, value)
        return self._unknown(node, value, f"the tracer does not know {name}")

    # -- helpers --------------------------------------------------------------------------------

    def _is_tensor(self, arg) -> bool:
        return hasattr(arg, "meta") and isinstance(self.labels.get(arg), list)

    def _arg(self, node, index: int):
        return self.labels.get(node.args[index])

    def _mark_used(self, node) -> None:
        for arg in _flat_args(node):
            labels = self.labels.get(arg) if hasattr(arg, "meta") else None
            if isinstance(labels, list):
                for label in labels:
                    for factor in label:
                        if factor[0] == "S":
                            self.used[factor[1]] = True

    def _fixed(self, value, why):
        def one(tensor):
            return [((("F", size, why),) if size > 1 else ()) for size in tensor.shape]

        if isinstance(value, torch.Tensor):
            return one(value)
        if isinstance(value, (tuple, list)):
            return tuple(one(item) if isinstance(item, torch.Tensor) else None for item in value)
        return None

    def _pin_factor(self, factor: Factor, node: str, reason: str, boundary: bool) -> None:
        if factor[0] == "S":
            self.spaces.pin(factor[1], node, reason, boundary)
        elif factor[0] == "W":
            for part in self.heads[factor[1]][1]:
                self.spaces.pin(part, node, reason, boundary)

    def _pin_all(self, labels, node: str, reason: str, boundary: bool = False) -> None:
        if isinstance(labels, tuple):
            for item in labels:
                self._pin_all(item, node, reason, boundary)
        elif isinstance(labels, list):
            for label in labels:
                for factor in label:
                    self._pin_factor(factor, node, reason, boundary)

    def _unknown(self, node, value, reason: str):
        for arg in _flat_args(node):
            if hasattr(arg, "meta"):
                self._pin_all(self.labels.get(arg), node.name, reason)
        return self._fixed(value, f"{node.name}: {reason}")

    def _unite_factors(self, x: Factor, y: Factor, node: str) -> None:
        if x == y:
            return
        kinds = x[0] + y[0]
        if kinds == "SS":
            self.spaces.unite(x[1], y[1])
        elif kinds == "WW" and self._heads_aligned(x[1], y[1]):
            for a, b in zip(self.heads[x[1]][1], self.heads[y[1]][1]):
                self.spaces.unite(a, b)
        elif kinds != "FF":
            fixed = x if x[0] == "F" else y if y[0] == "F" else None
            if fixed is None:
                reason, boundary = "meets units it cannot be aligned with", False
            else:
                reason, boundary = ("meets a fixed axis", True) if fixed[2] is None else (f"meets {fixed[2]}", False)
            self._pin_factor(x, node, reason, boundary)
            self._pin_factor(y, node, reason, boundary)

    def _heads_aligned(self, a: int, b: int) -> bool:
        (head_a, parts_a), (head_b, parts_b) = self.heads[a], self.heads[b]
        return len(parts_a) == len(parts_b) and self.spaces.find(head_a) == self.spaces.find(head_b)

    def _unite(self, a: Label, b: Label, node: str) -> None:
        """Make dimension labels ``a`` and ``b`` (of equal size) carry the same units."""
        if a == b:
            return
        if len(a) == len(b) and all(self._size(x) == self._size(y) for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self._unite_factors(x, y, node)
            return
        for whole, tiled in ((a, b), (b, a)):
            # [fixed n, units] against one space: that space is n copies of the units (a weight's
            # input axis reading tokens x features flattened together).
            if len(whole) == 1 and whole[0][0] == "S" and tiled and tiled[-1][0] == "S" and all(f[0] == "F" for f in tiled[:-1]):
                copies = math.prod(f[1] for f in tiled[:-1])
                for part in self.spaces.split(whole[0][1], copies):
                    self.spaces.unite(part, tiled[-1][1])
                return
        for factor in a + b:
            self._pin_factor(factor, node, "units blocked with other positions (e.g. a channel flattened with its pixels)", False)

    def _size(self, factor: Factor) -> int:
        if factor[0] == "F":
            return factor[1]
        if factor[0] == "S":
            return self.spaces.size[self.spaces.find(factor[1])]
        return self.spaces.size[self.spaces.find(self.heads[factor[1]][1][0])]

    def _broadcast(self, node, args, value):
        """Elementwise over broadcast operands: aligned dimensions of equal size carry the same units."""
        shape = tuple(value.shape)
        result = []
        operands = [(self.labels[arg], tuple(arg.meta["val"].shape)) for arg in args]
        for dim in range(len(shape)):
            chosen = ()
            for labels, operand_shape in operands:
                offset = dim - (len(shape) - len(operand_shape))
                if offset < 0 or operand_shape[offset] != shape[dim] or shape[dim] == 1:
                    continue
                if chosen == ():
                    chosen = labels[offset]
                else:
                    self._unite(chosen, labels[offset], node.name)
            result.append(chosen)
        return result

    # -- shapes ---------------------------------------------------------------------------------

    def _reshape(self, node, labels, out_shape):
        queue = [factor for label in labels for factor in label]
        result = []
        try:
            for size in out_shape:
                if size == 1:
                    result.append(())
                    continue
                taken, product = [], 1
                while product < size:
                    factor = queue.pop(0)
                    factor_size = self._size(factor)
                    if size % (product * factor_size) == 0:
                        taken.append(factor)
                        product *= factor_size
                        continue
                    need = size // product
                    if size % product or factor_size % need:
                        raise _Untracked
                    outer, inner = self._split_factor(factor, need, factor_size // need)
                    taken.append(outer)
                    queue.insert(0, inner)
                    product *= need
                result.append(self._merge(taken))
            if queue:
                raise _Untracked
        except (_Untracked, IndexError):
            self._pin_all(labels, node.name, "a reshape the tracer cannot follow")
            return self._fixed(node.meta["val"], f"{node.name}: a reshape the tracer cannot follow")
        return result

    def _split_factor(self, factor: Factor, outer: int, inner: int):
        if factor[0] == "F":
            return ("F", outer, factor[2]), ("F", inner, factor[2])
        if factor[0] == "S":
            parts = self.spaces.split(factor[1], outer)
            head = self.spaces.new(outer, [("", "whole attention heads are not permuted", True)])
            self.heads.append((head, parts))
            return ("S", head), ("W", len(self.heads) - 1)
        raise _Untracked

    def _merge(self, factors: List[Factor]) -> Label:
        if all(factor[0] == "F" for factor in factors):
            why = next((factor[2] for factor in factors if factor[2] is not None), None)
            return (("F", math.prod(factor[1] for factor in factors), why),)
        merged: List[Factor] = []
        for factor in factors:
            if merged and factor[0] == "W" and merged[-1][0] == "S":
                head, parts = self.heads[factor[1]]
                if self.spaces.find(head) == self.spaces.find(merged[-1][1]):
                    merged[-1] = ("S", self.spaces.made_of(parts))
                    continue
            if merged and factor[0] == "F" and merged[-1][0] == "F":
                merged[-1] = ("F", merged[-1][1] * factor[1], merged[-1][2] or factor[2])
                continue
            merged.append(factor)
        return tuple(merged)

    def _op_permute(self, node, value):
        labels = self._arg(node, 0)
        return [labels[dim % len(labels)] for dim in node.args[1]]

    def _op_transpose(self, node, value):
        labels = list(self._arg(node, 0))
        a, b = (dim % len(labels) for dim in node.args[1:3])
        labels[a], labels[b] = labels[b], labels[a]
        return labels

    def _op_t(self, node, value):
        return list(reversed(self._arg(node, 0)))

    def _op_expand(self, node, value):
        labels = self._arg(node, 0)
        shape = tuple(value.shape)
        lead = len(shape) - len(labels)
        fixed = self._fixed(value, None)
        return [fixed[dim] if dim < lead or not labels[dim - lead] else labels[dim - lead] for dim in range(len(shape))]

    def _op_select(self, node, value):
        labels = list(self._arg(node, 0))
        dim = node.args[1] % len(labels)
        index = node.args[2] % node.args[0].meta["val"].shape[dim]
        return self._take(labels, dim, index, node.name)

    def _take(self, labels: List[Label], dim: int, index: int, node: str) -> List[Label]:
        """Labels after selecting position ``index`` of ``dim``. Selecting one head of a head split
        (a fused q/k/v projection split into 3 "heads", as ``nn.MultiheadAttention`` does) leaves
        that head's part of the units; any other selection of units pins them."""
        label = labels[dim]
        if len(label) == 1 and label[0][0] == "S":
            head = self.spaces.find(label[0][1])
            within = {factor[1] for other in labels for factor in other
                      if factor[0] == "W" and self.spaces.find(self.heads[factor[1]][0]) == head}
            if within:
                chosen = {record: ("S", self.heads[record][1][index]) for record in within}
                rest = labels[:dim] + labels[dim + 1:]
                return [tuple(chosen.get(f[1], f) if f[0] == "W" else f for f in other) for other in rest]
        self._pin_label(label, node, "one unit of it is selected")
        return labels[:dim] + labels[dim + 1:]

    def _pin_label(self, label: Label, node: str, reason: str) -> None:
        for factor in label:
            self._pin_factor(factor, node, reason, False)

    def _op_slice(self, node, value):
        labels = list(self._arg(node, 0))
        source = node.args[0].meta["val"]
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(labels)
        length = source.shape[dim]
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        stop = node.args[3] if len(node.args) > 3 and node.args[3] is not None else length
        step = node.args[4] if len(node.args) > 4 else 1
        start, stop = max(0, start + length if start < 0 else start), min(length, stop + length if stop < 0 else stop)
        if start == 0 and stop >= length and step == 1:
            return labels
        labels[dim] = self._part(labels[dim], start, stop - start, step, node.name, value.shape[dim])
        return labels

    def _part(self, label: Label, start: int, size: int, step: int, node: str, out_size: int) -> Label:
        """The label of units ``[start, start + size)`` of a dimension."""
        if not label or all(factor[0] == "F" for factor in label):
            return (("F", out_size, label[0][2] if label else None),) if out_size > 1 else ()
        if len(label) == 1 and label[0][0] == "S" and step == 1:
            return (("S", self.spaces.range(label[0][1], start, size)),) if size > 1 else ()
        self._pin_label(label, node, "a strided or blocked slice")
        return (("F", out_size, f"{node}: a strided or blocked slice"),) if out_size > 1 else ()

    def _op_split(self, node, value):
        labels = self._arg(node, 0)
        dim = (node.args[2] if len(node.args) > 2 else 0) % len(labels)
        outputs, start = [], 0
        for piece in value:
            size = piece.shape[dim]
            out = list(labels)
            out[dim] = self._part(labels[dim], start, size, 1, node.name, size)
            outputs.append(out)
            start += size
        return tuple(outputs)

    _op_split_with_sizes = _op_split
    _op_chunk = _op_split

    def _op_unbind(self, node, value):
        labels = list(self._arg(node, 0))
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(labels)
        return tuple(self._take(labels, dim, index, node.name) for index in range(len(value)))

    def _op_cat(self, node, value):
        tensors = [arg for arg in node.args[0] if self._is_tensor(arg) and arg.meta["val"].numel() > 0]
        ndim = value.dim()
        dim = (node.args[1] if len(node.args) > 1 else 0) % ndim
        labels = [self.labels[arg] for arg in tensors]
        for other in labels[1:]:
            for d in range(ndim):
                if d != dim:
                    self._unite(labels[0][d], other[d], node.name)
        pieces = [label[dim] for label in labels]
        if all(not piece or all(f[0] == "F" for f in piece) for piece in pieces):
            out = (("F", value.shape[dim], None),)
        else:
            parts = []
            for piece, arg in zip(pieces, tensors):
                if len(piece) == 1 and piece[0][0] == "S":
                    parts.append(piece[0][1])
                else:
                    self._pin_label(piece, node.name, "concatenated in blocks")
                    parts.append(self.spaces.new(arg.meta["val"].shape[dim], [(node.name, "concatenated with fixed positions", False)]))
            out = (("S", self.spaces.made_of(parts)),)
        return [out if d == dim else labels[0][d] for d in range(ndim)]

    def _op_stack(self, node, value):
        tensors = [arg for arg in node.args[0] if self._is_tensor(arg)]
        dim = (node.args[1] if len(node.args) > 1 else 0) % value.dim()
        labels = [self.labels[arg] for arg in tensors]
        for other in labels[1:]:
            for a, b in zip(labels[0], other):
                self._unite(a, b, node.name)
        fixed = (("F", len(tensors), None),) if len(tensors) > 1 else ()
        return list(labels[0][:dim]) + [fixed] + list(labels[0][dim:])

    def _op_cumsum(self, node, value):
        labels = self._arg(node, 0)
        self._pin_label(labels[node.args[1] % len(labels)], node.name, "a running sum along it")
        return labels

    def _op_flip(self, node, value):
        labels = self._arg(node, 0)
        for dim in node.args[1]:
            self._pin_label(labels[dim % len(labels)], node.name, "flipped")
        return labels

    def _op_constant_pad_nd(self, node, value):
        labels = list(self._arg(node, 0))
        pads = node.args[1]
        for k in range(len(pads) // 2):
            dim = len(labels) - 1 - k
            if pads[2 * k] or pads[2 * k + 1]:
                self._pin_label(labels[dim], node.name, "padded")
                labels[dim] = (("F", value.shape[dim], None),)
        return labels

    _op_pad = _op_constant_pad_nd

    def _reduce(self, node, value):
        labels = self._arg(node, 0)
        dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(len(labels)))
        dims = [dims] if isinstance(dims, int) else list(dims)
        reduced = {dim % len(labels) for dim in dims} if labels else set()
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else False)
        out = [() if dim in reduced else label for dim, label in enumerate(labels) if keep or dim not in reduced]
        if isinstance(value, (tuple, list)):  # var_mean
            return tuple(list(out) for _ in value)
        return out

    def _op_max(self, node, value):
        if isinstance(value, (tuple, list)):  # max.dim: (values, indices); indices depend on unit order
            labels = self._arg(node, 0)
            dim = node.args[1] % len(labels)
            self._pin_label(labels[dim], node.name, "an argmax over it")
            out = self._reduce(node, value[0])
            return (out, list(out))
        if len(node.args) > 1 and self._is_tensor(node.args[1]):
            return self._broadcast(node, [node.args[0], node.args[1]], value)
        return []

    _op_min = _op_max

    def _pool(self, node, value):
        labels = self._arg(node, 0)
        spatial = int(next(ch for ch in _aten_name(node.target) if ch.isdigit()))
        out = list(labels[: len(labels) - spatial]) + self._fixed(value[0] if isinstance(value, (tuple, list)) else value, None)[-spatial:]
        for label in labels[len(labels) - spatial:]:
            for factor in label:
                if factor[0] != "F":
                    self._pin_factor(factor, node.name, "pooled over", False)
        return (out, list(out)) if isinstance(value, (tuple, list)) else out

    # -- layers ---------------------------------------------------------------------------------

    def _op_linear(self, node, value):
        x, weight = self._arg(node, 0), self._arg(node, 1)
        bias = self._arg(node, 2) if len(node.args) > 2 and node.args[2] is not None else None
        self._unite(x[-1], weight[1], node.name)
        if bias is not None:
            self._unite(weight[0], bias[0], node.name)
        self._note_sites(node, x[-1], weight[0], 1 if len(x) == 2 else -1)
        return list(x[:-1]) + [weight[0]]

    def _conv(self, node, value):
        x, weight = self._arg(node, 0), self._arg(node, 1)
        bias = self._arg(node, 2) if len(node.args) > 2 and node.args[2] is not None else None
        args = list(node.args) + [None] * 9
        if _aten_name(node.target) in ("convolution", "_convolution"):
            transposed, groups = bool(args[6]), int(args[8] or 1)
        else:
            transposed, groups = False, int(args[6] or 1)
        if transposed:
            return self._unknown(node, value, "transposed convolutions are not traced")
        channel = len(x) - (len(weight) - 2) - 1  # 1 for a batch, 0 for one unbatched example
        in_size, out_size = node.args[0].meta["val"].shape[channel], node.args[1].meta["val"].shape[0]
        if bias is not None:
            self._unite(weight[0], bias[0], node.name)
        if groups == 1:
            self._unite(x[channel], weight[1], node.name)
            self._note_sites(node, x[channel], weight[0], 1)
        elif in_size == groups and out_size == groups:
            # Depthwise: output channel c reads input channel c only; permuting both alike is a symmetry.
            self._unite(x[channel], weight[0], node.name)
            self._note_sites(node, (), weight[0], 1)
        else:
            self._grouped(node, x[channel], weight, groups)
        for label in weight[2:]:
            for factor in label:
                self._pin_factor(factor, node.name, "kernel taps", True)
        fixed = self._fixed(value, None)
        return list(x[:channel]) + [weight[0]] + fixed[channel + 1:]

    def _grouped(self, node, channels: Label, weight, groups: int) -> None:
        """A grouped convolution: one permutation for every input group (it acts on the weight's
        input axis, which all groups share), each output group permuted on its own."""
        if len(channels) == 1 and channels[0][0] == "S" and weight[1]:
            for part in self.spaces.split(channels[0][1], groups):
                self._unite((("S", part),), weight[1], node.name)
        else:
            self._pin_label(channels, node.name, "the input of a grouped convolution")
            self._pin_label(weight[1], node.name, "the input of a grouped convolution")
        if weight[0]:
            self.spaces.split(weight[0][0][1], groups)

    def _batch_norm(self, node, value):
        x = self._arg(node, 0)
        for index in (1, 2, 3, 4):
            if index < len(node.args) and self._is_tensor(node.args[index]):
                self._unite(x[1], self.labels[node.args[index]][0], node.name)
        self._note_sites(node, (), x[1], 1)
        if isinstance(value, (tuple, list)):
            return tuple(list(x) if i == 0 else ([x[1]] if isinstance(v, torch.Tensor) and v.dim() == 1 else self._fixed(v, None))
                         for i, v in enumerate(value))
        return list(x)

    def _op_layer_norm(self, node, value):
        x = self._arg(node, 0)
        normalized = len(node.args[1])
        for index in (2, 3):
            if index < len(node.args) and self._is_tensor(node.args[index]):
                parameter = self.labels[node.args[index]]
                for k in range(normalized):
                    self._unite(x[len(x) - normalized + k], parameter[k], node.name)
        self._note_sites(node, (), x[-1], 1 if len(x) == 2 else -1)
        if isinstance(value, (tuple, list)):
            return tuple(list(x) if i == 0 else self._fixed(v, None) for i, v in enumerate(value))
        return list(x)

    _op_native_layer_norm = _op_layer_norm

    _op_rms_norm = _op_layer_norm

    def _op_group_norm(self, node, value):
        x = self._arg(node, 0)
        groups = node.args[1]
        channels = x[1]
        # Statistics are per group: units may move only within their group.
        if len(channels) == 1 and channels[0][0] == "S":
            self.spaces.split(channels[0][1], groups)
        elif channels:
            self._pin_label(channels, node.name, "group-normalised in blocks")
        for index in (2, 3):
            if index < len(node.args) and self._is_tensor(node.args[index]):
                self._unite(channels, self.labels[node.args[index]][0], node.name)
        self._note_sites(node, (), channels, 1)
        return list(x)

    def _op_embedding(self, node, value):
        weight, indices = self._arg(node, 0), self._arg(node, 1)
        for factor in weight[0]:
            self._pin_factor(factor, node.name, "embedding rows are picked by the input", True)
        return list(indices) + [weight[1]]

    def _matmul(self, node, a, b, a_shape, b_shape, value):
        """``a @ b`` with broadcast batch dims: the contracted dims carry the same units."""
        a_vector, b_vector = len(a) == 1, len(b) == 1
        a = list(a) if not a_vector else [()] + list(a)
        b = list(b) if not b_vector else list(b) + [()]
        a_shape = tuple(a_shape) if not a_vector else (1,) + tuple(a_shape)
        b_shape = tuple(b_shape) if not b_vector else tuple(b_shape) + (1,)
        batch = []
        a_batch, b_batch = a[:-2], b[:-2]
        width = max(len(a_batch), len(b_batch))
        for k in range(width):
            ia, ib = k - (width - len(a_batch)), k - (width - len(b_batch))
            la = a_batch[ia] if ia >= 0 and a_shape[ia] > 1 else ()
            lb = b_batch[ib] if ib >= 0 and b_shape[ib] > 1 else ()
            if la and lb:
                self._unite(la, lb, node.name)
            batch.append(la or lb)
        self._unite(a[-1], b[-2], node.name)  # after the batch dims: heads are aligned by then
        out = batch + ([] if a_vector else [a[-2]]) + ([] if b_vector else [b[-1]])
        return out

    def _op_mm(self, node, value):
        a, b = node.args[0], node.args[1]
        return self._matmul(node, self.labels[a], self.labels[b], a.meta["val"].shape, b.meta["val"].shape, value)

    _op_bmm = _op_mm
    _op_matmul = _op_mm

    def _op_addmm(self, node, value):
        out = self._matmul(node, self._arg(node, 1), self._arg(node, 2), node.args[1].meta["val"].shape, node.args[2].meta["val"].shape, value)
        bias = node.args[0]
        fake = _Labelled(tuple(value.shape))
        self.labels[fake] = out
        return self._broadcast(node, [fake, bias], value)

    _op_baddbmm = _op_addmm

    def _op_scaled_dot_product_attention(self, node, value):
        q, k, v = (self._arg(node, i) for i in range(3))
        shapes = [tuple(node.args[i].meta["val"].shape) for i in range(3)]
        # q·kᵀ over the feature dim; scores·v over the key tokens.
        scores = self._matmul(node, q, list(k[:-2]) + [k[-1], k[-2]], shapes[0], shapes[1][:-2] + (shapes[1][-1], shapes[1][-2]), value)
        out = self._matmul(node, scores, v, tuple(shapes[0][:-1]) + (shapes[1][-2],), shapes[2], value)
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if mask is not None and self._is_tensor(mask):
            fake = _Labelled(tuple(shapes[0][:-1]) + (shapes[1][-2],))
            self.labels[fake] = scores
            self._broadcast(node, [fake, mask], fake.meta["val"])
        return out

    # -- sites and the spec ---------------------------------------------------------------------

    def _module_of(self, node, kinds) -> Optional[str]:
        """The module (of exactly one of ``kinds``, called once) whose forward is this op."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return None
        path, _ = list(stack.values())[-1]
        module = self.modules.get(path)
        if type(module) not in kinds or len(self.calls.get(path, ())) != 1 or getattr(module, "padding_mode", "zeros") != "zeros":
            return None
        return path

    def _note_sites(self, node, consumed: Label, produced: Label, dim: int) -> None:
        """Remember where units can be observed: the input of the consuming Linear/Conv module
        and the output of the producing Linear/Conv/normalisation module."""
        consumer = self._module_of(node, _CONSUMERS)
        if consumer is not None and len(consumed) == 1 and consumed[0][0] == "S":
            for leaf, offset in self._leaf_offsets(consumed[0][1]):
                self.input_sites.append((leaf, offset, consumer, dim))
        producer = self._module_of(node, _CONSUMERS + _PRODUCERS)
        if producer is not None and len(produced) == 1 and produced[0][0] == "S":
            for leaf, offset in self._leaf_offsets(produced[0][1]):
                self.output_sites.append((leaf, offset, producer, dim))

    def _leaf_offsets(self, space: int) -> List[Tuple[int, int]]:
        result, offset = [], 0
        for leaf in self.spaces.leaves(space):
            result.append((leaf, offset))
            offset += self.spaces.size[leaf]
        return result

    def _spec(self) -> TracedSpec:
        spaces = self.spaces
        classes: Dict[int, List[Axis]] = {}
        for name, dim, space in self.tensor_axes:
            offset = 0
            for leaf in spaces.leaves(space):
                classes.setdefault(spaces.find(leaf), []).append(Axis(name, dim, offset))
                offset += spaces.size[leaf]
        sites: Dict[int, Dict[str, List[Site]]] = {}
        for where, noted in (("input", self.input_sites), ("output", self.output_sites)):
            for leaf, offset, module, dim in noted:
                # A site's offset must be where the *final* leaf starts; notes taken before a later
                # refinement cover several final leaves.
                position = offset
                for final in spaces.leaves(leaf):
                    sites.setdefault(spaces.find(final), {}).setdefault(where, []).append(Site(module, where, dim, position))
                    position += spaces.size[final]
        groups, left_out, names = [], [], set()
        for root, axes in classes.items():
            size = spaces.size[root]
            if size < 2:
                continue
            pins = spaces.pins.get(root, [])
            if pins:
                unproven = [(node, reason) for node, reason, boundary in pins if not boundary]
                if unproven and not any(boundary for _, _, boundary in pins):
                    nodes, reasons = zip(*dict.fromkeys(unproven))
                    left_out.append(LeftOut(size, tuple(axes), nodes, reasons))
                continue
            name = _group_name(axes, size, names)
            found = sites.get(root, {})
            inputs = _distinct(found.get("input", []))
            outputs = _distinct(found.get("output", []))
            chosen = tuple(inputs) if inputs else tuple(outputs[-1:])
            groups.append(Group(name, size, tuple(axes), chosen))
        return TracedSpec(groups, left_out)


def _distinct(sites: List[Site]) -> List[Site]:
    return list(dict.fromkeys(sites))


def _group_name(axes: Sequence[Axis], size: int, taken: set) -> str:
    producer = next((axis for axis in axes if axis.axis == 0), axes[0])
    module = producer.name.rsplit(".", 1)[0] if producer.name.endswith((".weight", ".bias")) else producer.name
    name = module if producer.offset == 0 else f"{module}[{producer.offset}:{producer.offset + size}]"
    if producer.axis != 0:
        name = f"{name}:{producer.axis}"
    unique, k = name, 2
    while unique in taken:
        unique, k = f"{name}#{k}", k + 1
    taken.add(unique)
    return unique


class _Untracked(Exception):
    pass


class _Labelled:
    """A stand-in node for an intermediate result (``addmm``'s product, attention scores)."""

    def __init__(self, shape):
        self.meta = {"val": torch.empty(shape, device="meta")}


def _flat_args(node):
    for arg in list(node.args) + list(node.kwargs.values()):
        if isinstance(arg, (list, tuple)):
            yield from arg
        else:
            yield arg
