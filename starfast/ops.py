"""The compiled ops of starfast and their pure-PyTorch references.

This module owns the bridge to ``starfast._C``: it loads the extension (warning once and falling
back to the references when it is absent), registers the fake (meta) implementations, the
autograd formulas, and exposes each op as a plain function:

- ``permute(rows, index, out=None)``: ``rows[..., index]`` — apply a permutation index map to one
  or many flat rows (``index`` ``[P]`` shared, or ``[K, P]`` one per row).
- ``lerp_gather(theta, bank, n, index, t)``: ``(1 - t) * theta + t * bank[n][index]`` in one pass;
  the gradient flows to ``theta`` only (``d theta = (1 - t) * d out``). ``n`` and ``t`` may be
  tensors, so ``torch.vmap`` evaluates several ``(n, index, t)`` at once (the op's vmap rule).
- ``linear_assignment_op(cost, maximize)``: the raw batched LAP op (see :mod:`starfast.lap`).

Every op has a ``*_reference`` twin written with ordinary torch calls; tests compare the two.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

try:
    from starfast import _C  # noqa: F401  (importing registers the ops)

    HAVE_EXTENSION = True
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    HAVE_EXTENSION = False
    warnings.warn(
        f"starfast's compiled extension is not available ({error}); using the slower pure-PyTorch "
        "references. Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def _compiled_for(*tensors: torch.Tensor) -> bool:
    """True when the extension has a kernel for the device of these tensors."""
    if not HAVE_EXTENSION:
        return False
    device = tensors[0].device.type
    if device == "cpu":
        return True
    if device == "cuda":
        return torch._C._dispatch_has_kernel_for_dispatch_key("starfast::permute", "CUDA")
    return device == "meta"


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
# Fake (meta) implementations so the ops trace under torch.compile / FakeTensor.

if HAVE_EXTENSION:

    @torch.library.register_fake("starfast::permute")
    def _permute_fake(rows, index):
        return torch.empty_like(rows, memory_format=torch.contiguous_format)

    @torch.library.register_fake("starfast::permute_out")
    def _permute_out_fake(rows, index, out):
        return None

    @torch.library.register_fake("starfast::lerp_gather")
    def _lerp_gather_fake(theta, bank, n, index, t):
        return torch.empty_like(theta, memory_format=torch.contiguous_format)

    @torch.library.register_vmap("starfast::lerp_gather")
    def _lerp_gather_vmap(info, in_dims, theta, bank, n, index, t):
        # One call per batch element (each reads its own n and t on the host); any argument may
        # be batched, e.g. several draws (n, index_maps[n], t) against one θ.
        def element(tensor, dim, k):
            return tensor if tensor is None or dim is None else tensor.select(dim, k)

        rows = [
            torch.ops.starfast.lerp_gather(*(element(arg, dim, k) for arg, dim in zip((theta, bank, n, index, t), in_dims)))
            for k in range(info.batch_size)
        ]
        return torch.stack(rows), 0

    @torch.library.register_fake("starfast::linear_assignment")
    def _linear_assignment_fake(cost, maximize):
        return cost.new_empty(cost.shape[:-1], dtype=torch.long)

    def _lerp_gather_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[4])

    def _lerp_gather_backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * (1.0 - t.to(device=grad.device, dtype=grad.dtype)), None, None, None, None

    torch.library.register_autograd(
        "starfast::lerp_gather", _lerp_gather_backward, setup_context=_lerp_gather_setup_context
    )

    def _permute_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def _permute_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        # A permutation's adjoint scatters back: grad_in[..., index] = grad.
        grad_in = torch.zeros_like(grad)
        grad_in.scatter_(-1, index.long().expand_as(grad), grad)
        return grad_in, None

    torch.library.register_autograd("starfast::permute", _permute_backward, setup_context=_permute_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions


def permute(rows: torch.Tensor, index: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather flat rows through a permutation index map: ``rows[..., index]``.

    ``rows`` is ``[..., P]``; ``index`` is ``[P]`` (applied to every row) or ``[K, P]`` with
    ``rows`` ``[K, P]``. With ``out`` (contiguous, same shape, not aliasing ``rows``) the result is
    written in place there, e.g. into a model bank.
    """
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"permute: index must be int64 or int32, got {index.dtype}")
    if index.shape[-1] != rows.shape[-1]:
        raise ValueError(f"permute: index has length {index.shape[-1]} but rows have {rows.shape[-1]}")
    if not _compiled_for(rows):
        result = permute_reference(rows, index)
        if out is None:
            return result
        out.copy_(result)
        return out
    if out is None:
        return torch.ops.starfast.permute(rows, index)
    torch.ops.starfast.permute_out(rows, index, out)
    return out


def lerp_gather(
    theta: torch.Tensor,
    bank: torch.Tensor,
    n: Union[int, torch.Tensor],
    index: Optional[torch.Tensor],
    t: Union[float, torch.Tensor],
) -> torch.Tensor:
    """``(1 - t) * theta + t * bank[n][index]`` without materialising the permuted source.

    ``theta`` is ``[P]``, ``bank`` ``[N, P]``, ``index`` ``[P]`` or ``None`` (no permutation), ``n``
    an int and ``t`` a float, or one-element CPU tensors (then ``torch.vmap`` can batch them:
    ``vmap(lambda n, i, t: lerp_gather(theta, bank, n, i, t))(ns, index_maps[ns], ts)`` is
    ``[S, P]``; batching n and t needs the compiled extension). Differentiable in ``theta`` (the
    bank receives no gradient).
    """
    if _compiled_for(theta):
        n = n if isinstance(n, torch.Tensor) else torch.tensor(int(n))
        t = t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)
        return torch.ops.starfast.lerp_gather(theta, bank, n, index, t)
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
    """The raw LAP op on a CPU tensor ``[n, n]`` or ``[B, n, n]``; see :mod:`starfast.lap`."""
    return torch.ops.starfast.linear_assignment(cost, maximize)
