"""Fully connected networks: ``mlp`` and the paper's two-layer ``linear2``, with their spec.

``MLP`` flattens each example, applies ``depth`` hidden Linear layers of ``width`` units, each
followed by an elementwise activation, and a Linear output layer. Every hidden layer's units are
one permutation group (that layer's weight rows and bias, the next layer's weight columns),
observed at the next layer's input (after the activation).

``MLP.stacked_forward`` runs K models whose parameters are stacked ``[K, ...]`` as one batched
matmul per layer: training many small seeds at once (``--parallel-seeds``) pays ``vmap`` and
``functional_call`` overhead on every step, which at these sizes costs more than the arithmetic.

``linear2`` is the network of the paper's theory (Appendix A): one hidden layer without biases,
``f(x) = W2 act(W1 x)``, activation ``identity`` (the linear network of Theorem 1) or ``elu``.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
from torch import nn

from starfast.models.layer_axes import input_axes, output_axes
from starfast.models.options import activation_maker
from starfast.models.options import boolean, positive_int
from starfast.spec import Group, PermutationSpec, Site


class MLP(nn.Module):
    """``Flatten -> [Linear(width) -> act] * depth -> Linear(num_classes)``."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int = 2,
        width: int = 128,
        activation: str = "relu",
        bias: bool = True,
    ):
        super().__init__()
        positive_int("depth", depth)
        positive_int("width", width)
        boolean("bias", bias)
        self.hidden = nn.ModuleList(
            nn.Linear(in_features if i == 0 else width, width, bias=bias) for i in range(depth)
        )
        self.activation = activation_maker("mlp", activation)()
        self.output = nn.Linear(width, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.activation(layer(x))
        return self.output(x)

    def stacked_forward(self, params: Dict[str, torch.Tensor], x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """K models at once: ``params`` maps this module's parameter names to ``[K, ...]``
        tensors; ``x`` is ``[K, B, ...]`` (one batch per model) or, with ``shared``, ``[B, ...]``
        for all. Returns logits ``[K, B, num_classes]``, equal to running each model on its batch."""
        count = next(iter(params.values())).shape[0]
        x = x.flatten(1).expand(count, -1, -1) if shared else x.flatten(2)
        # Features-major activations [K, features, B]: each layer is W @ h, so the backward's
        # weight gradient (grad @ hᵀ) comes out [K, out, in] like the weight itself. The row-major
        # form (h @ Wᵀ) yields transposed gradients, which cost a strided copy per step to store and
        # make the optimizer's updates strided (together ~40% of a width-128 step on CPU).
        h = x.transpose(1, 2)
        layers = [(f"hidden.{i}", True) for i in range(len(self.hidden))] + [("output", False)]
        for name, activate in layers:
            weight = params[f"{name}.weight"]
            bias = params.get(f"{name}.bias")
            h = torch.bmm(weight, h) if bias is None else torch.baddbmm(bias.unsqueeze(2), weight, h)
            if activate:
                h = self.activation(h)
        return h.transpose(1, 2)

    def permutation_spec(self) -> PermutationSpec:
        consumers = [(f"hidden.{i}", layer) for i, layer in enumerate(self.hidden)][1:] + [("output", self.output)]
        groups = []
        for i, layer in enumerate(self.hidden):
            consumer_name, consumer = consumers[i]
            axes = output_axes(f"hidden.{i}", layer) + input_axes(consumer_name, consumer)
            groups.append(Group(f"hidden.{i}", layer.out_features, axes, (Site(consumer_name, "input", 1),)))
        return PermutationSpec(groups)


def build_mlp(
    num_classes: int,
    in_channels: int,
    input_shape: Sequence[int],
    *,
    depth: int = 2,
    width: int = 128,
    activation: str = "relu",
    bias: bool = True,
) -> MLP:
    return MLP(_in_features("mlp", input_shape), num_classes, depth, width, activation, bias)


def build_linear2(
    num_classes: int,
    in_channels: int,
    input_shape: Sequence[int],
    *,
    width: int = 128,
    activation: str = "identity",
) -> MLP:
    if activation not in ("identity", "elu"):
        raise ValueError(f"linear2: activation={activation!r} is not supported; choose 'identity' or 'elu'")
    return MLP(_in_features("linear2", input_shape), num_classes, 1, width, activation, bias=False)


def _in_features(name: str, input_shape) -> int:
    if input_shape is None:
        raise ValueError(f"{name} flattens its input: pass input_shape, the shape of one example, e.g. (2,) or (1, 8, 8)")
    return math.prod(input_shape)

