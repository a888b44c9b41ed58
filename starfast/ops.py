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
the public functions use the references when the extension is absent.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from starfast.extension import core as _core

HAVE_EXTENSION = _core is not None
HAVE_CUDA_KERNELS = HAVE_EXTENSION and hasattr(_core, "permute_cuda")


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
# Argument checks shared by the backends' kernels (one set of messages)


def _check_index(index: torch.Tensor, length: int, op: str) -> None:
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: index must be int64 or int32, got {index.dtype}")
    if index.shape[-1] != length:
        raise ValueError(f"{op}: index has length {index.shape[-1]} but rows have {length}")


def _permute_operands(
    rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """rows ``[..., P]`` and index ``[P]`` or ``[R, P]`` as contiguous ``[R, P]`` / ``[1 or R, P]``;
    checks ``out`` (contiguous, shaped and typed like rows, not overlapping them)."""
    if rows.dim() == 0:
        raise ValueError("permute: rows must have at least one dimension")
    length = rows.shape[-1]
    _check_index(index, length, "permute")
    if index.device != rows.device:
        raise ValueError(f"permute: index is on {index.device} but rows are on {rows.device}")
    if rows.element_size() not in (2, 4, 8):
        raise TypeError(f"permute: rows of {rows.dtype} are not supported (elements of 2, 4 or 8 bytes are)")
    source = rows.contiguous().view(rows.shape[:-1].numel(), length)
    flat_index = index.contiguous().view(index.shape[:-1].numel(), length)
    if flat_index.shape[0] not in (1, source.shape[0]):
        raise ValueError(f"permute: index must be [P] or [{source.shape[0]}, P], got {list(index.shape)}")
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
    if bank.dtype != theta.dtype or theta.dtype not in _FLOAT_CODES:
        raise TypeError(f"lerp_gather: theta and bank must share one of float32, float64, bfloat16, float16; "
                        f"got {theta.dtype} and {bank.dtype}")
    if bank.device != theta.device:
        raise ValueError(f"lerp_gather: bank is on {bank.device} but theta is on {theta.device}")
    if not 0 <= n < bank.shape[0]:
        raise ValueError(f"lerp_gather: n = {n} is outside the bank of {bank.shape[0]}")
    if index is not None:
        if index.dim() != 1:
            raise ValueError(f"lerp_gather: index must be [P], got {list(index.shape)}")
        _check_index(index, length, "lerp_gather")
        if index.device != theta.device:
            raise ValueError(f"lerp_gather: index is on {index.device} but theta is on {theta.device}")
        index = index.contiguous()
    return theta.contiguous(), bank[n].contiguous(), index


def _lerp_gather_core_args(theta, source, index, out, t: float) -> tuple:
    index_args = (0, 0) if index is None else (index.data_ptr(), _INDEX_CODES[index.dtype])
    return (theta.data_ptr(), source.data_ptr(), index_args[0], out.data_ptr(), theta.shape[0], t,
            _FLOAT_CODES[theta.dtype], index_args[1])


def _cuda_launch(tensor: torch.Tensor) -> Tuple[int, int]:
    """The device of ``tensor`` and torch's current stream there: where the CUDA kernels launch."""
    return tensor.device.index, torch.cuda.current_stream(tensor.device).cuda_stream


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
        if rows.is_cuda:
            _core.permute_cuda(*args, *_cuda_launch(rows))
        else:
            _core.permute(*args, torch.get_num_threads())

    def _permute_kernel(rows, index):
        out = torch.empty_like(rows, memory_format=torch.contiguous_format)
        _permute_out_kernel(rows, index, out)
        return out

    def _lerp_gather_kernel(theta, bank, n, index, t):
        theta, source, index = _lerp_gather_operands(theta, bank, n, index)
        out = torch.empty_like(theta)
        args = _lerp_gather_core_args(theta, source, index, out, t)
        if theta.is_cuda:
            _core.lerp_gather_cuda(*args, *_cuda_launch(theta))
        else:
            _core.lerp_gather(*args, torch.get_num_threads())
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

    # -- fakes: shapes and dtypes only, for torch.compile / FakeTensor tracing

    @torch.library.register_fake("starfast::permute")
    def _permute_fake(rows, index):
        return torch.empty_like(rows, memory_format=torch.contiguous_format)

    @torch.library.register_fake("starfast::permute_out")
    def _permute_out_fake(rows, index, out):
        return None

    @torch.library.register_fake("starfast::lerp_gather")
    def _lerp_gather_fake(theta, bank, n, index, t):
        return torch.empty_like(theta, memory_format=torch.contiguous_format)

    @torch.library.register_fake("starfast::linear_assignment")
    def _linear_assignment_fake(cost, maximize):
        return cost.new_empty(cost.shape[:-1], dtype=torch.long)

    # -- autograd: one lean Autograd kernel per op, measured faster per call than the generic one
    # of torch.library.register_autograd (benchmarks/RESULTS.md, "Ops"), which matters on small
    # rows: Starlight calls lerp_gather every step. Both ops are differentiable in their first
    # argument only; the kernel hands the call below autograd unless that argument needs a
    # gradient, and otherwise records an autograd.Function node around that same call.

    class _LerpGatherBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, theta, bank, n, index, t):
            ctx.t = t
            return torch.ops.starfast.lerp_gather.default.redispatch(keyset, theta, bank, n, index, t)

        @staticmethod
        def backward(ctx, grad):
            return None, grad * (1.0 - ctx.t), None, None, None, None

    class _PermuteBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, rows, index):
            ctx.save_for_backward(index)
            return torch.ops.starfast.permute.default.redispatch(keyset, rows, index)

        @staticmethod
        def backward(ctx, grad):
            (index,) = ctx.saved_tensors
            # The adjoint of out[..., p] = rows[..., index[p]]: each output gradient is added back
            # where it was read from (a position the index repeats collects several).
            grad_rows = torch.zeros_like(grad)
            grad_rows.scatter_add_(-1, index.long().expand_as(grad), grad)
            return None, grad_rows, None

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


# ---------------------------------------------------------------------------------------------
# Public functions


def permute(rows: torch.Tensor, index: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather flat rows through a permutation index map: ``rows[..., index]``.

    ``rows`` is ``[..., P]``; ``index`` is ``[P]`` (applied to every row) or ``[K, P]`` with
    ``rows`` ``[K, P]``. With ``out`` (contiguous, same shape, not overlapping ``rows``) the result
    is written in place there, e.g. into a model bank; that form is not differentiable.
    """
    if not _compiled_for(rows):  # the ops' kernels check their arguments; the reference does not
        _check_index(index, rows.shape[-1], "permute")
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
    bit. Differentiable in ``theta`` (the bank receives no gradient).
    """
    if _compiled_for(theta):
        return torch.ops.starfast.lerp_gather.default(theta, bank, int(n), index, float(t))
    return _LerpGatherReference.apply(theta, bank, int(n), index, float(t))


class _LerpGatherReference(torch.autograd.Function):
    """The reference path with the same gradient contract as the op (bank gets none)."""

    @staticmethod
    def forward(ctx, theta, bank, n, index, t):
        ctx.t = t
        return lerp_gather_reference(theta, bank.detach(), n, index, t)

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 - ctx.t), None, None, None, None


def linear_assignment_op(cost: torch.Tensor, maximize: bool) -> torch.Tensor:
    """The raw LAP op on a CPU tensor ``[n, n]`` or ``[B, n, n]``; see :mod:`starfast.lap`.

    Outside torch.compile the CPU kernel is called directly: the op has no autograd formula and
    one backend, so the dispatcher's round trip through Python would only add its ~10 µs per
    call, half of a weight-matching solve at n = 64 (benchmarks/RESULTS.md, "Ops")."""
    if torch.compiler.is_compiling():
        return torch.ops.starfast.linear_assignment(cost, maximize)
    return _linear_assignment_kernel(cost, maximize)
