"""Checking that a permutation spec preserves a model's function: ``check_spec(model, spec, example_input)``.

A spec is trusted only after this check: the model is permuted by random permutations of all
groups at once and of each group alone (never the identity), and its outputs on
``example_input`` are compared with the unpermuted model's — in eval mode, and in train mode when
the model normalises with batch statistics (BatchNorm; dropout stays off so the two runs are
comparable), where the running statistics the forward pass updates must also come out permuted
alike. The tolerance is float32 rounding, :data:`TOLERANCE` of the largest output magnitude,
and the check runs on a float64 copy of the model (inputs cast alike): a permuted model reorders
every sum, and in train mode a BatchNorm over a small batch divides by a tiny variance, which in
float32 amplifies that reordering past float32 rounding (a correct MobileNetV2 spec differs by
1e-4 in float32, 1e-13 in float64). Models that cast to float32 inside (Llama's RMSNorm) still
differ by float32 rounding in the float64 copy (1e-7); a wrong spec differs by orders of
magnitude more. A model that does not run in float64 is checked in its own dtype. The result is a
:class:`SpecCheck`, one line per group; a failing check raises ``ValueError`` naming the group
with the largest difference.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from starfast.spec import Perm, PermutationSpec
from starfast.tracing import example_arguments

ALL_GROUPS = "all groups at once"
TOLERANCE = 256 * torch.finfo(torch.float32).eps  # ~3e-5 relative: float32 rounding of reordered sums


@dataclass(frozen=True)
class GroupCheck:
    """The largest relative output difference when ``group`` alone (or all groups) is permuted."""

    group: str
    size: int
    eval_difference: float
    train_difference: Optional[float]  # None when the model has no batch-statistics layers

    @property
    def largest(self) -> float:
        return max(self.eval_difference, self.train_difference or 0.0)


@dataclass(frozen=True)
class SpecCheck:
    """The outcome of :func:`check_spec`: one :class:`GroupCheck` per group, then all at once."""

    groups: Tuple[GroupCheck, ...]
    tolerance: float
    dtype: torch.dtype  # the dtype the check ran in

    @property
    def passed(self) -> bool:
        return all(check.largest <= self.tolerance for check in self.groups)

    @property
    def worst(self) -> GroupCheck:
        """The group alone with the largest difference; all groups at once only if no group alone fails."""
        alone = [check for check in self.groups if check.group != ALL_GROUPS]
        worst_alone = max(alone, key=lambda check: check.largest, default=None)
        if worst_alone is not None and worst_alone.largest > self.tolerance:
            return worst_alone
        return max(self.groups, key=lambda check: check.largest)

    def __str__(self) -> str:
        lines = [f"spec check: {len(self.groups) - 1} groups in {str(self.dtype).replace('torch.', '')}, "
                 f"tolerance {self.tolerance:.1e} (relative to the output scale)"]
        for check in self.groups:
            train = "" if check.train_difference is None else f", train {check.train_difference:.1e}"
            verdict = "ok" if check.largest <= self.tolerance else "FAILS"
            lines.append(f"  {check.group} ({check.size}): eval {check.eval_difference:.1e}{train}  {verdict}")
        return "\n".join(lines)


def check_spec(model: nn.Module, spec: PermutationSpec, example_input, *, seed: int = 0) -> SpecCheck:
    """Check that permuting ``model`` by ``spec`` leaves its outputs unchanged (module docstring).

    ``example_input``: a tensor, a tuple of positional inputs, or a dict of keyword inputs (two or
    more examples, so batch statistics mean something). Returns the :class:`SpecCheck`; raises
    ``ValueError`` naming the group with the largest difference if any exceeds the tolerance.
    """
    spec.validate(model)
    args, kwargs = example_arguments(example_input)
    generator = torch.Generator().manual_seed(seed)
    modes = ["eval"] + (["train"] if _has_batch_statistics(model) else [])
    model, args, kwargs = _in_float64(model, args, kwargs)
    tolerance = max(TOLERANCE, 256 * torch.finfo(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)).eps)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    state = model.state_dict()
    trials: List[Tuple[str, int, Perm]] = [(group.name, group.size, _moving(spec, [group], generator)) for group in spec.groups]
    trials.append((ALL_GROUPS, sum(group.size for group in spec.groups), _moving(spec, spec.groups, generator)))
    checks = []
    with _modes_restored(model):
        references = {mode: _run(model, mode, state, args, kwargs) for mode in modes}
        for name, size, perm in trials:
            permuted = spec.apply(state, perm)
            differences: Dict[str, float] = {}
            for mode in modes:
                outputs, after = _run(model, mode, permuted, args, kwargs)
                expected_outputs, expected_after = references[mode]
                difference = _relative_difference(expected_outputs, outputs)
                if mode == "train":  # the running statistics it updated must come out permuted alike
                    expected = spec.apply(expected_after, perm)
                    difference = max(difference, _relative_difference([expected[k] for k in after], list(after.values())))
                differences[mode] = difference
            checks.append(GroupCheck(name, size, differences["eval"], differences.get("train")))
    report = SpecCheck(tuple(checks), tolerance, dtype)
    if not report.passed:
        worst = report.worst
        raise ValueError(
            f"check_spec: permuting group {worst.group!r} ({worst.size} units) changes the model's outputs by up to "
            f"{worst.largest:.3g} of their scale (tolerance {tolerance:.1e}); the spec does not preserve the function "
            f"there: fix that group or leave its axes out.\n{report}"
        )
    return report


def _in_float64(model: nn.Module, args, kwargs):
    """A float64 copy of ``model`` with floating inputs cast alike; the model itself when it does
    not run in float64."""
    def cast(value):
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    copy64 = copy.deepcopy(model).double()
    args64, kwargs64 = tuple(cast(a) for a in args), {key: cast(value) for key, value in kwargs.items()}
    try:
        with torch.no_grad(), _modes_restored(copy64):
            copy64.eval()
            copy64(*args64, **kwargs64)
    except Exception:  # e.g. a float32-only custom op: check in the model's own precision
        return model, args, kwargs
    return copy64, args64, kwargs64


def _moving(spec: PermutationSpec, groups, generator: torch.Generator) -> Perm:
    """Identity on every group except ``groups``, which get random permutations that move something."""
    perm = spec.identity()
    for group in groups:
        if group.size < 2:
            continue
        while True:
            candidate = torch.randperm(group.size, generator=generator)
            if not torch.equal(candidate, perm[group.name]):
                perm[group.name] = candidate
                break
    return perm


def _has_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


@contextlib.contextmanager
def _modes_restored(model: nn.Module):
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _run(model: nn.Module, mode: str, state, args, kwargs):
    """Outputs (tensor leaves) of ``model`` with ``state`` swapped in and, in train mode, the
    floating-point state after the forward pass (buffers are copied first: BatchNorm updates them)."""
    model.train(mode == "train")
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    if mode == "train":
        state = {key: value.clone() for key, value in state.items()}
    with torch.no_grad():
        outputs = functional_call(model, state, args, kwargs, tie_weights=False)
    leaves = [leaf for leaf in tree_leaves(dict(outputs) if isinstance(outputs, dict) else outputs) if isinstance(leaf, torch.Tensor)]
    if not leaves:
        raise ValueError(f"check_spec: {type(model).__name__} returned no tensors to compare ({type(outputs).__name__})")
    after = {key: value for key, value in state.items() if value.is_floating_point()} if mode == "train" else {}
    return leaves, after


def _relative_difference(expected: List[torch.Tensor], actual: List[torch.Tensor]) -> float:
    largest, scale = 0.0, 0.0
    for a, b in zip(expected, actual):
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return float("inf")
            continue
        a, b = a.double(), b.double()
        largest = max(largest, float((a - b).abs().max()) if a.numel() else 0.0)
        scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
    return largest / max(scale, 1e-30) if largest else 0.0
