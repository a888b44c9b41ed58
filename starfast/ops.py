"""The compiled ops of starfast and their pure-PyTorch references.

This module registers the ops in the ``starfast::`` namespace through ``torch.library``: their
schemas; per backend (CPU, and CUDA when the extension was built with nvcc) a kernel that checks
its arguments and hands pointers to the torch-free compiled core (:mod:`starfast.extension`,
csrc/ops/kernels.hpp); fake implementations for torch.compile / FakeTensor tracing; and the
autograd formulas. It exposes each op as a plain function:

- ``permute(rows, index, out=None)``: ``rows[..., index]`` — apply a permutation index map to one
  or many flat rows (``index`` ``[P]`` shared, or ``[K, P]`` one per row). Differentiable in
  ``rows`` (the adjoint of a gather is a scatter-add, correct for any index).
- ``lerp_gather(theta, bank, n, index, t)``: ``(1 - t) * theta + t * bank[n][index]`` in one pass,
  rounded exactly as ``torch.lerp``; the gradient flows to ``theta`` only
  (``d theta = (1 - t) * d out``).
- ``linear_assignment_op(cost, maximize)``: the raw batched LAP op (see :mod:`starfast.lap`).

Every op has a ``*_reference`` twin written with ordinary torch calls; tests compare the two, and
the public functions use the references when the extension is absent (or disabled with
``STARFAST_NO_EXTENSION=1``, see :mod:`starfast.extension`).

Index values are never trusted: the kernels check each one as they read through it (one compare
inside their single pass, csrc/ops/index.hpp), never read outside a tensor, and the op raises an
``IndexError`` naming the first out-of-range value; the reference path checks with a min/max pass
first. On a GPU that report costs a device synchronisation per call, which
:func:`trusted_index_maps` waives for the index maps starfast builds itself.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional, Tuple

import torch

from starfast.extension import core as _core

HAVE_EXTENSION = _core is not None
HAVE_CUDA_KERNELS = HAVE_EXTENSION and hasattr(_core, "permute_cuda")
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # lerp_gather's row types


def _compiled_for(tensor: torch.Tensor) -> bool:
    """True when a registered kernel (or the fake one) serves the device of ``tensor``."""
    if not HAVE_EXTENSION:
        return False
    device = tensor.device.type
    return device in ("cpu", "meta") or (device == "cuda" and HAVE_CUDA_KERNELS)


# ---------------------------------------------------------------------------------------------
# References


def permute_reference(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[..., index]`` with a shared ``[P]`` index or one ``[K, P]`` index per row."""
    if index.dim() == 1:
        return rows.index_select(-1, index.long())
    return torch.gather(rows, -1, index.long().expand_as(rows))


def lerp_gather_reference(
    theta: torch.Tensor, bank: torch.Tensor, n: int, index: Optional[torch.Tensor], t: float
) -> torch.Tensor:
    source = bank[n] if index is None else bank[n].index_select(0, index.long())
    return torch.lerp(theta, source.to(theta.dtype), t)


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the backends' kernels, their fakes and the reference path (one set of
# messages)


def _check_index(index: torch.Tensor, length: int, op: str) -> None:
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: index must be int64 or int32, got {index.dtype}")
    if index.dim() == 0 or index.shape[-1] != length:
        raise ValueError(f"{op}: index has shape {list(index.shape)} but rows have length {length}")


def _check_device(op: str, data_name: str, data: torch.Tensor, name: str, other: Optional[torch.Tensor]) -> None:
    """``other`` (if given) must be on ``data``'s device: a ``meta`` index with CPU rows would
    otherwise reach the shape-only fake kernel and return uninitialised memory."""
    if other is not None and other.device != data.device:
        raise ValueError(f"{op}: {name} is on {other.device}, {data_name} on {data.device}; "
                         f"move {name} to {data.device}")


def _out_of_range(op: str, index: torch.Tensor, position: int, length: int) -> IndexError:
    """The error for the out-of-range value at flat ``position`` of ``index``."""
    value = int(index.reshape(-1)[position])
    where = f"index[{position}]" if index.dim() == 1 else f"index[{position // length}, {position % length}]"
    return IndexError(f"{op}: {where} = {value} is out of range for rows of length {length} "
                      f"(valid: 0 to {length - 1})")


def _check_index_values(index: torch.Tensor, length: int, op: str) -> None:
    """The reference path's bounds check: one min/max pass (the kernels check as they gather).
    A ``meta`` index has no values (and its data, also on ``meta``, none to read)."""
    if index.numel() == 0 or index.is_meta:
        return
    low, high = torch.aminmax(index)
    if int(low) < 0 or int(high) >= length:
        bad = ((index < 0) | (index >= length)).reshape(-1).nonzero()[0, 0]
        raise _out_of_range(op, index, int(bad), length)


class _Trust(threading.local):
    index_maps = False  # True inside trusted_index_maps() on this thread


_TRUST = _Trust()


@contextlib.contextmanager
def trusted_index_maps() -> Iterator[None]:
    """Within this block (on this thread) the CUDA kernels do not report out-of-range index values,
    which saves a device synchronisation per call; they still never read out of bounds (such a value
    reads its element's own position). For internal callers only, around index maps starfast built
    itself: :meth:`~starfast.spec.PermutationSpec.index_map` of permutations that
    :meth:`~starfast.spec.PermutationSpec.check_perm` validated, on the ParamSpace the spec was
    checked against, holds only values in ``[0, P)`` by construction. The CPU kernels report at no
    cost and always do; the reference path always checks."""
    previous, _TRUST.index_maps = _TRUST.index_maps, True
    try:
        yield
    finally:
        _TRUST.index_maps = previous


def _permute_operands(
    rows: torch.Tensor, index: torch.Tensor, out: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """rows ``[..., P]`` and index ``[P]`` or ``[R, P]`` as contiguous ``[R, P]`` / ``[1 or R, P]``;
    checks ``out`` if given (contiguous, shaped and typed like rows, not overlapping them)."""
    if rows.dim() == 0:
        raise ValueError("permute: rows must have at least one dimension")
    length = rows.shape[-1]
    _check_index(index, length, "permute")
    _check_device("permute", "rows", rows, "index", index)
    if rows.element_size() not in (2, 4, 8):
        raise TypeError(f"permute: rows of {rows.dtype} are not supported (elements of 2, 4 or 8 bytes are)")
    source = rows.contiguous().view(rows.shape[:-1].numel(), length)
    flat_index = index.contiguous().view(index.shape[:-1].numel(), length)
    if flat_index.shape[0] not in (1, source.shape[0]):
        raise ValueError(f"permute: index must be [P] or [{source.shape[0]}, P], got {list(index.shape)}")
    if out is None:
        return source, flat_index
    if not out.is_contiguous() or out.shape != rows.shape or out.dtype != rows.dtype or out.device != rows.device:
        raise ValueError("permute: out must be a contiguous tensor shaped and typed like rows, on their device")
    size = source.numel() * source.element_size()
    if size and abs(out.data_ptr() - source.data_ptr()) < size:
        raise ValueError("permute: out must not overlap rows")
    return source, flat_index


def _permute_core_args(source: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> tuple:
    return (source.data_ptr(), index.data_ptr(), out.data_ptr(), source.shape[0], source.shape[1],
            index.shape[0] == 1, source.element_size(), _INDEX_CODES[index.dtype])


def _lerp_gather_operands(
    theta: torch.Tensor, bank: torch.Tensor, n: int, index: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """theta ``[P]``, the bank row ``n`` and the index ``[P]`` (or None), checked and contiguous."""
    if theta.dim() != 1:
        raise ValueError(f"lerp_gather: theta must be [P], got {list(theta.shape)}")
    length = theta.shape[0]
    if bank.dim() != 2 or bank.shape[1] != length:
        raise ValueError(f"lerp_gather: bank must be [N, {length}], got {list(bank.shape)}")
    if bank.dtype != theta.dtype or theta.dtype not in _FLOATS:
        raise TypeError(f"lerp_gather: theta and bank must share one of float32, float64, bfloat16, float16; "
                        f"got {theta.dtype} and {bank.dtype}")
    _check_device("lerp_gather", "theta", theta, "bank", bank)
    if not 0 <= n < bank.shape[0]:
        raise ValueError(f"lerp_gather: n = {n} is outside the bank of {bank.shape[0]}")
    if index is not None:
        if index.dim() != 1:
            raise ValueError(f"lerp_gather: index must be [P], got {list(index.shape)}")
        _check_index(index, length, "lerp_gather")
        _check_device("lerp_gather", "theta", theta, "index", index)
        index = index.contiguous()
    return theta.contiguous(), bank[n].contiguous(), index


def _lerp_gather_core_args(theta, source, index, out, t: float) -> tuple:
    index_args = (0, 0) if index is None else (index.data_ptr(), _INDEX_CODES[index.dtype])
    return (theta.data_ptr(), source.data_ptr(), index_args[0], out.data_ptr(), theta.shape[0], t,
            _FLOAT_CODES[theta.dtype], index_args[1])


def _run_kernel(op: str, cpu_kernel, cuda_kernel, args: tuple, data: torch.Tensor, index: Optional[torch.Tensor],
                length: int) -> None:
    """Runs an op's compiled kernel on ``data``'s device and raises for the lowest out-of-range
    index position it reports. The CUDA kernels write it to a one-element slot on the device
    (read back with a synchronisation), unless inside :func:`trusted_index_maps`."""
    if data.is_cuda:
        slot = None if index is None or _TRUST.index_maps else torch.full((1,), -1, dtype=torch.int64, device=data.device)
        stream = torch.cuda.current_stream(data.device).cuda_stream
        cuda_kernel(*args, 0 if slot is None else slot.data_ptr(), data.device.index, stream)
        bad = -1 if slot is None else int(slot.item())
    else:
        bad = cpu_kernel(*args, torch.get_num_threads())
    if bad >= 0:
        raise _out_of_range(op, index, bad, length)


# ---------------------------------------------------------------------------------------------
# Gradient formulas, shared by the ops' autograd kernels and the reference path


def _lerp_gather_theta_grad(grad: torch.Tensor, t: float) -> torch.Tensor:
    return grad * (1.0 - t)


def _permute_adjoint(grad: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The adjoint of out[..., p] = rows[..., index[p]]: each output gradient is added back where
    it was read from (a position the index repeats collects several)."""
    grad_rows = torch.zeros_like(grad)
    return grad_rows.scatter_add_(-1, index.long().expand_as(grad), grad)


# The lean autograd kernels (below) use two private dispatcher pieces, present in torch 2.13 (which
# uses them itself inside register_autograd); without either, or with STARFAST_PUBLIC_AUTOGRAD=1 (a
# workaround should a torch release change them, and how the tests run that path), the ops take
# the public torch.library.register_autograd.
LEAN_AUTOGRAD = (os.environ.get("STARFAST_PUBLIC_AUTOGRAD", "") != "1" and hasattr(torch._C, "_after_autograd_keyset")
                 and hasattr(torch._ops.OpOverload, "redispatch"))

# ---------------------------------------------------------------------------------------------
# Registration: schemas, per-backend kernels, fakes, autograd

if HAVE_EXTENSION:
    _FLOAT_CODES = {torch.float32: _core.FLOAT32, torch.float64: _core.FLOAT64,
                    torch.bfloat16: _core.BFLOAT16, torch.float16: _core.FLOAT16}
    _INDEX_CODES = {torch.int32: _core.INT32, torch.int64: _core.INT64}

    _library = torch.library.Library("starfast", "DEF")
    # cost [n, n] or [B, n, n], float32/float64 -> int64 column assigned to each row.
    _library.define("linear_assignment(Tensor cost, bool maximize) -> Tensor")
    # rows [..., P] gathered along the last axis by index [P] or [K, P] (int64 or int32).
    _library.define("permute(Tensor rows, Tensor index) -> Tensor")
    _library.define("permute_out(Tensor rows, Tensor index, Tensor(a!) out) -> ()")
    # (1 - t) * theta + t * bank[n][index]; index may be None (plain lerp with bank row n).
    _library.define("lerp_gather(Tensor theta, Tensor bank, int n, Tensor? index, float t) -> Tensor")

    # -- kernels: one wrapper per op for both backends; the core's CPU kernels take torch's
    # intra-op thread count, its CUDA kernels the device and torch's current stream there.

    def _permute_out_kernel(rows, index, out):
        source, flat_index = _permute_operands(rows, index, out)
        args = _permute_core_args(source, flat_index, out)
        _run_kernel("permute", _core.permute, getattr(_core, "permute_cuda", None), args, rows, index, source.shape[1])

    def _permute_kernel(rows, index):
        out = torch.empty_like(rows, memory_format=torch.contiguous_format)
        _permute_out_kernel(rows, index, out)
        return out

    def _lerp_gather_kernel(theta, bank, n, index, t):
        theta, source, index = _lerp_gather_operands(theta, bank, n, index)
        out = torch.empty_like(theta)
        args = _lerp_gather_core_args(theta, source, index, out, t)
        _run_kernel("lerp_gather", _core.lerp_gather, getattr(_core, "lerp_gather_cuda", None), args, theta, index,
                    theta.shape[0])
        return out

    def _linear_assignment_kernel(cost, maximize):
        if cost.dim() not in (2, 3) or cost.shape[-1] != cost.shape[-2]:
            raise ValueError(f"linear_assignment: cost must be [n, n] or [B, n, n], got {list(cost.shape)}")
        if cost.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"linear_assignment: cost must be float32 or float64, got {cost.dtype}")
        problems = cost.contiguous()
        batch, n = (1 if cost.dim() == 2 else cost.shape[0]), cost.shape[-1]
        out = torch.empty(cost.shape[:-1], dtype=torch.int64)
        _core.linear_assignment(problems.data_ptr(), _FLOAT_CODES[cost.dtype], batch, n, maximize, out.data_ptr(),
                                torch.get_num_threads())
        return out

    _library.impl("linear_assignment", _linear_assignment_kernel, "CPU")  # the solver is CPU-only
    for _backend in ("CPU", "CUDA") if HAVE_CUDA_KERNELS else ("CPU",):
        _library.impl("permute", _permute_kernel, _backend)
        _library.impl("permute_out", _permute_out_kernel, _backend)
        _library.impl("lerp_gather", _lerp_gather_kernel, _backend)

    # -- fakes: shapes and dtypes only, for torch.compile / FakeTensor tracing. They also serve
    # the Meta dispatch key, which wins when any argument is on `meta`: the device checks keep a
    # real tensor with a meta index from getting an uninitialised result.

    @torch.library.register_fake("starfast::permute")
    def _permute_fake(rows, index):
        _check_device("permute", "rows", rows, "index", index)
        return torch.empty_like(rows, memory_format=torch.contiguous_format)

    @torch.library.register_fake("starfast::permute_out")
    def _permute_out_fake(rows, index, out):
        _check_device("permute", "rows", rows, "index", index)
        _check_device("permute", "rows", rows, "out", out)
        return None

    @torch.library.register_fake("starfast::lerp_gather")
    def _lerp_gather_fake(theta, bank, n, index, t):
        _check_device("lerp_gather", "theta", theta, "bank", bank)
        _check_device("lerp_gather", "theta", theta, "index", index)
        return torch.empty_like(theta, memory_format=torch.contiguous_format)

    @torch.library.register_fake("starfast::linear_assignment")
    def _linear_assignment_fake(cost, maximize):
        return cost.new_empty(cost.shape[:-1], dtype=torch.long)

    # -- autograd: both ops are differentiable in their first argument only. Where torch has the
    # private dispatcher pieces it needs (LEAN_AUTOGRAD), one lean Autograd kernel per op, measured
    # faster per call than the generic one of torch.library.register_autograd (benchmarks/
    # RESULTS.md, "Ops"), which matters on small rows: Starlight calls lerp_gather every step. It
    # hands the call below autograd unless that argument needs a gradient, and otherwise records
    # an autograd.Function node around that same call. Elsewhere the public register_autograd with
    # the same formulas.

    if LEAN_AUTOGRAD:

        class _LerpGatherBackward(torch.autograd.Function):
            @staticmethod
            def forward(ctx, keyset, theta, bank, n, index, t):
                ctx.t = t
                return torch.ops.starfast.lerp_gather.default.redispatch(keyset, theta, bank, n, index, t)

            @staticmethod
            def backward(ctx, grad):
                return None, _lerp_gather_theta_grad(grad, ctx.t), None, None, None, None

        class _PermuteBackward(torch.autograd.Function):
            @staticmethod
            def forward(ctx, keyset, rows, index):
                ctx.save_for_backward(index)
                return torch.ops.starfast.permute.default.redispatch(keyset, rows, index)

            @staticmethod
            def backward(ctx, grad):
                return None, _permute_adjoint(grad, *ctx.saved_tensors), None

        def _autograd_kernel(name: str, function: type):
            op = getattr(torch.ops.starfast, name).default

            def kernel(keyset, first, *rest):
                keyset = keyset & torch._C._after_autograd_keyset
                if first.requires_grad and torch.is_grad_enabled():
                    return function.apply(keyset, first, *rest)
                return op.redispatch(keyset, first, *rest)

            _library.impl(name, kernel, "Autograd", with_keyset=True)

        _autograd_kernel("lerp_gather", _LerpGatherBackward)
        _autograd_kernel("permute", _PermuteBackward)
    else:

        def _lerp_gather_setup(ctx, inputs, output):
            ctx.t = inputs[4]

        def _lerp_gather_backward(ctx, grad):
            return _lerp_gather_theta_grad(grad, ctx.t), None, None, None, None

        def _permute_setup(ctx, inputs, output):
            ctx.save_for_backward(inputs[1])

        def _permute_backward(ctx, grad):
            return _permute_adjoint(grad, *ctx.saved_tensors), None

        torch.library.register_autograd("starfast::lerp_gather", _lerp_gather_backward, setup_context=_lerp_gather_setup)
        torch.library.register_autograd("starfast::permute", _permute_backward, setup_context=_permute_setup)


# ---------------------------------------------------------------------------------------------
# Public functions


def permute(rows: torch.Tensor, index: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather flat rows through a permutation index map: ``rows[..., index]``.

    ``rows`` is ``[..., P]``; ``index`` is ``[P]`` (applied to every row) or ``[K, P]`` with
    ``rows`` ``[K, P]``. With ``out`` (contiguous, same shape, not overlapping ``rows``) the result
    is written in place there, e.g. into a model bank; that form is not differentiable. An index
    value outside ``[0, P)`` raises ``IndexError`` naming the first one (nothing outside ``rows``
    is read; ``out`` may then hold partial results).
    """
    if not _compiled_for(rows):  # the kernels' checks, then the values (which the kernels check as they read)
        _permute_operands(rows, index, out)
        _check_index_values(index, rows.shape[-1], "permute")
        result = permute_reference(rows, index)
        if out is None:
            return result
        out.copy_(result)
        return out
    if out is None:
        return torch.ops.starfast.permute.default(rows, index)
    torch.ops.starfast.permute_out.default(rows, index, out)
    return out


def lerp_gather(theta: torch.Tensor, bank: torch.Tensor, n: int, index: Optional[torch.Tensor], t: float) -> torch.Tensor:
    """``(1 - t) * theta + t * bank[n][index]`` without materialising the permuted source.

    ``theta`` is ``[P]``, ``bank`` ``[N, P]``, ``index`` ``[P]`` or ``None`` (no permutation), ``n``
    an int and ``t`` a float. The result equals ``torch.lerp(theta, bank[n][index], t)`` bit for
    bit. Differentiable in ``theta`` (the bank receives no gradient). An index value outside
    ``[0, P)`` raises ``IndexError`` naming the first one; nothing outside the bank is read.
    """
    if _compiled_for(theta):
        return torch.ops.starfast.lerp_gather.default(theta, bank, int(n), index, float(t))
    _lerp_gather_operands(theta, bank, int(n), index)  # the kernel's checks, then the index values
    if index is not None:
        _check_index_values(index, theta.shape[0], "lerp_gather")
    return _LerpGatherReference.apply(theta, bank, int(n), index, float(t))


class _LerpGatherReference(torch.autograd.Function):
    """The reference path with the same gradient contract as the op (bank gets none)."""

    @staticmethod
    def forward(ctx, theta, bank, n, index, t):
        ctx.t = t
        return lerp_gather_reference(theta, bank.detach(), n, index, t)

    @staticmethod
    def backward(ctx, grad):
        return _lerp_gather_theta_grad(grad, ctx.t), None, None, None, None


def linear_assignment_op(cost: torch.Tensor, maximize: bool) -> torch.Tensor:
    """The raw LAP op on a CPU tensor ``[n, n]`` or ``[B, n, n]``; see :mod:`starfast.lap`.

    Outside torch.compile the CPU kernel is called directly: the op has no autograd formula and
    one backend, so the dispatcher's round trip through Python would only add its ~10 µs per
    call, half of a weight-matching solve at n = 64 (benchmarks/RESULTS.md, "Ops")."""
    if torch.compiler.is_compiling():
        return torch.ops.starfast.linear_assignment(cost, maximize)
    return _linear_assignment_kernel(cost, maximize)
