"""Loss and accuracy barriers along the linear path between two models (paper eq. (1), App. B).

This module owns:

- ``evaluate_rows``: mean loss and accuracy of the ``K`` models of a ``[K, P]`` bank at once
  (``torch.func.vmap`` over rows, eval mode, the given per-model BatchNorm statistics).
- ``barrier_curve``: the models ``(1 - t) * a + t * b`` on a grid of ``t``, built as one ``[T, P]``
  bank, their BatchNorm statistics recomputed in one batched pass over the training data, and
  their losses and accuracies on the train (and test) data, with the barriers, as a
  ``BarrierCurve``.
- ``loss_barrier``: eq. (1) on arrays, ``max_t [L(t) - ((1 - t) L(0) + t L(1))]``.

The two models are taken as given: matching their permutations is the caller's business.

Loss: ``loss="cross_entropy"`` expects outputs ``[B, C]`` and integer labels ``[B]``;
``loss="binary"`` expects one logit per example (outputs ``[B]`` or ``[B, 1]``) and labels in
``{0, 1}`` (binary cross-entropy on the logit, predicted class ``logit > 0``); ``loss="auto"`` (the
default) picks ``binary`` when the model gives one output per example, else ``cross_entropy``.
Data: see :mod:`starfast.bank` (a callable returning fresh ``(x, y)`` batches, or a re-iterable).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from starfast.bank import Data, check_bank, run_bank
from starfast.bn import batchnorm_buffer_names, recompute_bn
from starfast import models
from starfast.flat import ParamSpace
from starfast.repair import repair_kind, repaired_buffers
from starfast.spec import PermutationSpec
from starfast.training_common import is_correct, per_example_loss

LOSSES = ("auto", "cross_entropy", "binary")


# -- evaluation of a bank --------------------------------------------------------------------------


@torch.no_grad()
def evaluate_rows(
    skeleton: nn.Module,
    rows: torch.Tensor,
    buffers: Optional[Mapping[str, torch.Tensor]],
    data: Data,
    *,
    space: Optional[ParamSpace] = None,
    loss: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
    argument: str = "data",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy over ``data`` of every row of ``rows``, in eval mode.

    Args:
        skeleton: a module of the architecture (not changed).
        rows: ``[K, P]`` bank (or one ``[P]`` row).
        buffers: per-model buffers ``{name: [K, ...]}`` (e.g. from :func:`starfast.bn.recompute_bn`);
            buffers not named here are taken from the skeleton and shared. ``None`` is allowed
            only for models without BatchNorm running statistics.
        data: ``(x, y)`` batches (see the module docstring).
        space, chunk_size, memory_budget_bytes: as in :func:`starfast.bn.recompute_bn`.
        loss: ``"auto"``, ``"cross_entropy"`` or ``"binary"`` (see the module docstring).
        argument: the name of ``data`` in error messages.

    Returns:
        ``(loss [K], accuracy [K])`` as float64, averaged over examples (not over batches);
        0-d tensors for a ``[P]`` row.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    space, bank, single = check_bank(skeleton, rows, space, "rows")
    per_model = _check_buffers(skeleton, buffers, bank, single)
    count = bank.shape[0]
    loss_sum = torch.zeros(count, dtype=torch.float64, device=bank.device)
    hits = torch.zeros(count, dtype=torch.float64, device=bank.device)
    examples = [0]

    def accumulate(outputs: torch.Tensor, y: torch.Tensor) -> None:
        batch_loss, batch_hits = _loss_and_hits(outputs, y, loss, argument)
        loss_sum.add_(batch_loss)
        hits.add_(batch_hits)
        examples[0] += outputs.shape[1]

    run_bank(
        skeleton, space, bank, per_model, data,
        on_outputs=accumulate, argument=argument,
        chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
    )
    mean_loss, accuracy = loss_sum / examples[0], hits / examples[0]
    return (mean_loss[0], accuracy[0]) if single else (mean_loss, accuracy)


def _check_buffers(
    skeleton: nn.Module, buffers: Optional[Mapping[str, torch.Tensor]], bank: torch.Tensor, single: bool
) -> Dict[str, torch.Tensor]:
    """``buffers`` as ``[K, ...]`` tensors on the bank's device; errors name what is wrong."""
    statistics = batchnorm_buffer_names(skeleton)
    if buffers is None:
        if statistics:
            raise ValueError(
                "buffers is None but the skeleton has BatchNorm running statistics; pass "
                "recompute_bn(skeleton, rows, train_data) or the models' own buffers stacked as [K, ...]"
            )
        return {}
    own = dict(skeleton.named_buffers())
    unknown = [name for name in buffers if name not in own]
    if unknown:
        raise ValueError(f"buffers has {unknown[0]!r}, which is not a buffer of the skeleton")
    missing = [name for name in statistics if name not in buffers]
    if missing:
        raise ValueError(f"buffers lacks the BatchNorm statistic {missing[0]!r}; pass all of recompute_bn's output")
    checked = {}
    for name, value in buffers.items():
        value = value.unsqueeze(0) if single else value
        if tuple(value.shape) != (bank.shape[0], *own[name].shape):
            raise ValueError(
                f"buffers[{name!r}] has shape {list(value.shape)}, expected {[bank.shape[0], *own[name].shape]} "
                f"(one per row of rows)"
            )
        checked[name] = value.to(device=bank.device, dtype=bank.dtype if value.is_floating_point() else value.dtype)
    return checked


def _loss_and_hits(outputs: torch.Tensor, y: torch.Tensor, loss: str, argument: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and number of correct predictions of each model on one batch ``[K, B, ...]``
    (the losses and hits of :mod:`starfast.training_common`, after checking the shapes)."""
    count, size = outputs.shape[:2]
    if y.shape[:1] != (size,):
        raise ValueError(f"{argument}: a batch has {size} inputs but labels of shape {list(y.shape)}")
    binary = loss == "binary" or (loss == "auto" and outputs.shape[2:] in ((), (1,)))
    if binary:
        if outputs.shape[2:] not in ((), (1,)):
            raise ValueError(f"loss='binary' needs one logit per example, the model gives {list(outputs.shape[2:])}")
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(f"{argument}: loss='binary' needs labels in {{0, 1}}")
        outputs = outputs.reshape(count, size, 1)
    else:
        if outputs.dim() != 3:
            raise ValueError(f"loss='cross_entropy' needs outputs [B, C], the model gives {list(outputs.shape[1:])}")
        if y.is_floating_point() or y.dim() != 1:
            raise ValueError(f"{argument}: cross-entropy needs integer class labels [B], got {y.dtype} {list(y.shape)}")
    labels = y.reshape(size).expand(count, size)
    losses = per_example_loss(outputs, labels, binary)
    return losses.sum(1, dtype=torch.float64), is_correct(outputs, labels, binary).sum(1, dtype=torch.float64)


# -- barriers ---------------------------------------------------------------------------------------


def loss_barrier(losses: Union[torch.Tensor, Sequence[float]], ts: Union[torch.Tensor, Sequence[float]]) -> torch.Tensor:
    """Eq. (1) on a grid: ``max_t [L(t) - ((1 - t) L(0) + t L(1))]`` over the last axis.

    ``losses [..., T]`` are the losses at ``ts [T]``, which must contain 0 and 1 (the end points).
    Returns float64 of shape ``losses.shape[:-1]``. The accuracy barrier is
    ``loss_barrier(-accuracies, ts)``: the largest drop below the line between the end points.
    """
    losses = torch.as_tensor(losses, dtype=torch.float64)
    ts = torch.as_tensor(ts, dtype=torch.float64, device=losses.device)
    if ts.dim() != 1 or losses.dim() == 0 or losses.shape[-1] != ts.shape[0]:
        raise ValueError(f"losses [..., T] must end with the length of ts [T]; got {list(losses.shape)} and {list(ts.shape)}")
    start, end = _end_points(ts, "ts")
    line = (1 - ts) * losses[..., start : start + 1] + ts * losses[..., end : end + 1]
    return (losses - line).amax(-1)


@dataclass
class BarrierCurve:
    """Losses and accuracies at ``t`` along ``(1 - t) * a + t * b``, and the barriers.

    ``test_loss``/``test_acc`` are ``None`` without test data; ``loss_barrier`` and
    ``acc_barrier`` map ``"train"`` (and ``"test"``) to eq. (1) on this grid; ``repair``: what was
    done to the interior points' statistics (:func:`starfast.repair.repair_kind`).
    """

    t: torch.Tensor
    train_loss: torch.Tensor
    train_acc: torch.Tensor
    test_loss: Optional[torch.Tensor] = None
    test_acc: Optional[torch.Tensor] = None
    loss_barrier: Dict[str, float] = field(default_factory=dict)
    acc_barrier: Dict[str, float] = field(default_factory=dict)
    repair: str = "off"

    def to_dict(self) -> Dict[str, object]:
        """Plain lists and floats, ready for ``json.dump``."""

        def listed(values: Optional[torch.Tensor]) -> Optional[List[float]]:
            return None if values is None else [float(v) for v in values]

        return {
            "t": listed(self.t),
            "train_loss": listed(self.train_loss),
            "train_acc": listed(self.train_acc),
            "test_loss": listed(self.test_loss),
            "test_acc": listed(self.test_acc),
            "loss_barrier": dict(self.loss_barrier),
            "acc_barrier": dict(self.acc_barrier),
            "repair": self.repair,
        }


@torch.no_grad()
def barrier_curve(
    skeleton: nn.Module,
    row_a: torch.Tensor,
    row_b: torch.Tensor,
    train_data: Data,
    test_data: Optional[Data] = None,
    ts: Union[int, torch.Tensor, Sequence[float]] = 11,
    *,
    buffers_a: Optional[Mapping[str, torch.Tensor]] = None,
    buffers_b: Optional[Mapping[str, torch.Tensor]] = None,
    bn_batches: Optional[int] = None,
    space: Optional[ParamSpace] = None,
    loss: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
    repair: bool = False,
    spec: Optional[PermutationSpec] = None,
) -> BarrierCurve:
    """Loss and accuracy along the segment from ``row_a`` to ``row_b``, and the barriers.

    Args:
        skeleton: a module of the architecture (not changed).
        row_a, row_b: the two models as ``[P]`` rows (already matched, if matching is wanted).
        train_data: un-augmented training batches: BatchNorm statistics and the train curve.
        test_data: optional test batches for the test curve (normalised with the train statistics).
        ts: a number of equi-spaced points including both ends (the paper uses 11), or the points
            themselves (values in ``[0, 1]``, containing 0 and 1).
        buffers_a, buffers_b: the end models' own buffers (e.g. ``model.state_dict()``; only the
            BatchNorm statistics are read). An end point without them gets its statistics
            recomputed on ``train_data`` like the interior points.
        bn_batches: recompute BatchNorm statistics on only the first ``bn_batches`` batches.
        space: layout of the rows; ``ParamSpace(skeleton)`` when omitted.
        loss: ``"auto"``, ``"cross_entropy"`` or ``"binary"`` (see the module docstring).
        chunk_size, memory_budget_bytes: models per vmapped call, or its memory budget (see
            :func:`starfast.bn.recompute_bn`); ``chunk_size=1`` runs the points one by one without
            vmap, which can be faster on CPUs for convolutional nets.
        repair: REPAIR the interior points (:mod:`starfast.repair`): their per-channel
            pre-activation statistics set to the interpolation of the end points'; for a BatchNorm
            network that is the recomputation done anyway (RESET), and nothing changes.
        spec: the architecture's permutation spec, where REPAIR finds the layers to renormalise
            (default: :func:`starfast.models.permutation_spec` of the skeleton).

    All points are one ``[T, P]`` bank: their BatchNorm statistics come from one batched
    :func:`~starfast.bn.recompute_bn` and their losses from one batched :func:`evaluate_rows` per
    split.
    """
    space, a = _one_row(skeleton, row_a, space, "row_a")
    _, b = _one_row(skeleton, row_b, space, "row_b")
    if b.device != a.device or b.dtype != a.dtype:
        raise ValueError(f"row_a and row_b must share device and dtype, got {a.device}/{a.dtype} and {b.device}/{b.dtype}")
    grid = _grid(ts)
    weights = grid.to(device=a.device, dtype=a.dtype)
    bank = torch.lerp(a, b, weights[:, None])
    bank[weights == 0] = a
    bank[weights == 1] = b
    chunking = dict(chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes)
    buffers = _path_buffers(skeleton, space, bank, grid, train_data, buffers_a, buffers_b, bn_batches, chunking)
    kind = repair_kind(skeleton, repair)
    interior = ((grid > 0) & (grid < 1)).nonzero().flatten()
    # Each evaluated part: (its points on the grid, skeleton, its rows, their buffers).
    parts = [(torch.arange(len(grid)), skeleton, bank, buffers)]
    if kind == "repair" and len(interior):
        spec = spec if spec is not None else models.permutation_spec(skeleton)
        ends = (~((grid > 0) & (grid < 1))).nonzero().flatten()
        points = _select_rows(bank, interior)
        renormalised, repaired = repaired_buffers(
            skeleton, spec, space, points, grid[interior], ((a, dict(buffers_a or {})), (b, dict(buffers_b or {}))),
            train_data, max_batches=bn_batches, **chunking,
        )
        parts = [(ends, skeleton, bank[ends.to(bank.device)], {}), (interior, renormalised, points, repaired)]

    def evaluate(data: Data, argument: str) -> Tuple[torch.Tensor, torch.Tensor]:
        losses = torch.empty(len(grid), dtype=torch.float64)
        accuracies = torch.empty(len(grid), dtype=torch.float64)
        for where, module, rows, statistics in parts:
            part_losses, part_accuracies = evaluate_rows(
                module, rows, statistics, data, space=space, loss=loss, argument=argument, **chunking)
            losses[where], accuracies[where] = part_losses.cpu(), part_accuracies.cpu()
        return losses, accuracies

    curve = BarrierCurve(grid, *evaluate(train_data, "train_data"), repair=kind)
    splits = {"train": (curve.train_loss, curve.train_acc)}
    if test_data is not None:
        curve.test_loss, curve.test_acc = splits["test"] = evaluate(test_data, "test_data")
    for split, (losses, accuracies) in splits.items():
        curve.loss_barrier[split] = float(loss_barrier(losses, grid))
        curve.acc_barrier[split] = float(loss_barrier(-accuracies, grid))
    return curve


def _one_row(
    skeleton: nn.Module, row: torch.Tensor, space: Optional[ParamSpace], argument: str
) -> Tuple[ParamSpace, torch.Tensor]:
    space, bank, single = check_bank(skeleton, row, space, argument)
    if not single:
        raise ValueError(f"{argument} must be one model's row [P], got shape {list(row.shape)}")
    return space, bank[0]


def _grid(ts: Union[int, torch.Tensor, Sequence[float]]) -> torch.Tensor:
    """The interpolation points as float64 on CPU (see ``barrier_curve``'s ``ts``)."""
    if isinstance(ts, int) and not isinstance(ts, bool):
        if ts < 2:
            raise ValueError(f"ts as a count must be at least 2 (both end points), got {ts}")
        return torch.linspace(0, 1, ts, dtype=torch.float64)
    grid = torch.as_tensor(ts, dtype=torch.float64).cpu()
    if grid.dim() != 1 or not bool(((grid >= 0) & (grid <= 1)).all()):
        raise ValueError(f"ts must be a count or a 1-D set of points in [0, 1], got {ts!r}")
    _end_points(grid, "ts")
    return grid


def _end_points(ts: torch.Tensor, argument: str) -> Tuple[int, int]:
    """Indices of ``t = 0`` and ``t = 1`` in ``ts``: eq. (1) needs the end-point losses."""
    starts, ends = (ts == 0).nonzero(), (ts == 1).nonzero()
    if len(starts) == 0 or len(ends) == 0:
        raise ValueError(f"{argument} must contain both end points 0 and 1 (eq. (1) needs their losses)")
    return int(starts[0]), int(ends[0])


def _path_buffers(
    skeleton: nn.Module,
    space: ParamSpace,
    bank: torch.Tensor,
    grid: torch.Tensor,
    train_data: Data,
    buffers_a: Optional[Mapping[str, torch.Tensor]],
    buffers_b: Optional[Mapping[str, torch.Tensor]],
    bn_batches: Optional[int],
    chunking: Mapping[str, Optional[int]],
) -> Dict[str, torch.Tensor]:
    """``[T, ...]`` BatchNorm statistics for the bank: the end models' own where given, the rest
    recomputed together in one batched pass."""
    names = batchnorm_buffer_names(skeleton)
    if not names:
        return {}
    own = torch.zeros(len(grid), dtype=torch.bool)
    given: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = []
    for end, buffers, argument in ((0.0, buffers_a, "buffers_a"), (1.0, buffers_b, "buffers_b")):
        if buffers is not None:
            at_end = grid == end
            own |= at_end
            given.append((at_end, _end_statistics(skeleton, names, buffers, argument)))
    recompute = (~own).nonzero().flatten()
    if len(recompute) == 0:
        statistics = {}
    else:
        statistics = recompute_bn(
            skeleton, _select_rows(bank, recompute), train_data, space=space,
            max_batches=bn_batches, argument="train_data", **chunking,
        )
    references = dict(skeleton.named_buffers())
    path = {}
    for name in names:
        reference = references[name]
        dtype = bank.dtype if reference.is_floating_point() else reference.dtype
        column = torch.empty((len(grid), *reference.shape), dtype=dtype, device=bank.device)
        if len(recompute):
            column[recompute.to(bank.device)] = statistics[name]
        for at_end, end_statistics in given:
            column[at_end.to(bank.device)] = end_statistics[name].to(device=bank.device, dtype=dtype)
        path[name] = column
    return path


def _select_rows(bank: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``bank[rows]``, as a view when the rows are consecutive (the interior points of a curve are:
    copying them would write T - 2 whole models, 400 MB for ResNet-18 at T = 11)."""
    first = int(rows[0])
    if torch.equal(rows.cpu(), torch.arange(first, first + len(rows))):
        return bank[first : first + len(rows)]
    return bank[rows.to(bank.device)]


def _end_statistics(
    skeleton: nn.Module, names: List[str], buffers: Mapping[str, torch.Tensor], argument: str
) -> Dict[str, torch.Tensor]:
    """The BatchNorm statistics of one end model, read from its buffers or state dict."""
    if not isinstance(buffers, Mapping):
        raise TypeError(f"{argument} must be a mapping of buffer name -> tensor (e.g. model.state_dict())")
    shapes = {name: buffer.shape for name, buffer in skeleton.named_buffers()}
    picked = {}
    for name in names:
        if name not in buffers:
            raise ValueError(f"{argument} lacks the BatchNorm statistic {name!r}; pass the model's state_dict()")
        if buffers[name].shape != shapes[name]:
            raise ValueError(f"{argument}[{name!r}] has shape {list(buffers[name].shape)}, expected {list(shapes[name])}")
        picked[name] = buffers[name]
    return picked
