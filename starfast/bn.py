"""BatchNorm running statistics for banks of models, and running a bank of rows over data.

This module owns:

- ``recompute_bn``: exact cumulative (equal-weight per batch) BatchNorm running statistics over a
  dataset for ``K`` models at once — one ``torch.func.vmap`` over the rows of a ``[K, P]`` bank,
  with the parameters as views of the bank and the running statistics as stacked ``[K, ...]``
  buffers. This is what interpolated models need before evaluation (paper, Appendix B.3), and it
  equals ``torch.optim.swa_utils.update_bn`` run on each model separately.
- ``has_batchnorm`` / ``batchnorm_buffer_names``: whether a module has BatchNorm running
  statistics to recompute, and their names.
- ``run_bank``, shared with :mod:`starfast.barrier`: run every row of a bank over the data,
  chunked over ``K`` so that one vmapped call fits a memory budget, with ``check_bank`` (rows of
  this architecture) and ``iterate_batches`` (the data interface).

The data interface: ``data`` is either a callable returning a fresh iterable of ``(x, y)``
batches (e.g. ``lambda: ds.eval_batches("train", 256)``), or a re-iterable such as a list of
batches or a ``DataLoader``. A one-shot iterator (a generator object) is refused because a
barrier curve reads the training data more than once. The data should be un-augmented.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from starfast.flat import ParamSpace

Batch = Tuple[torch.Tensor, torch.Tensor]
Data = Union[Callable[[], Iterable[Batch]], Iterable[Batch]]

# Without an explicit budget, one vmapped call may use this much on CPU, or this share of the
# free memory on an accelerator.
DEFAULT_CPU_BUDGET_BYTES = 1 << 30
DEFAULT_ACCELERATOR_FREE_FRACTION = 0.5
# Under no_grad only a few activations are alive at once (a block's input kept for its residual
# sum, the current tensor, the next one, functional temporaries): a model's peak is taken as this
# many times its largest module output.
LIVE_ACTIVATIONS = 4


# -- BatchNorm --------------------------------------------------------------------------------------


def _tracking_batchnorms(module: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """``(qualified name, module)`` of every BatchNorm layer that keeps running statistics."""
    return [
        (name, child)
        for name, child in module.named_modules()
        if isinstance(child, _BatchNorm) and child.track_running_stats and child.running_mean is not None
    ]


def batchnorm_buffer_names(module: nn.Module) -> List[str]:
    """Names (as in ``module.state_dict()``) of the running statistics that BatchNorm layers keep."""
    names = []
    for prefix, layer in _tracking_batchnorms(module):
        prefix = f"{prefix}." if prefix else ""
        names += [prefix + "running_mean", prefix + "running_var"]
        if layer.num_batches_tracked is not None:
            names.append(prefix + "num_batches_tracked")
    return names


def has_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` contains a BatchNorm layer with running statistics to recompute.

    BatchNorm layers built with ``track_running_stats=False`` always normalise with the batch's
    own statistics, so they do not count.
    """
    return bool(_tracking_batchnorms(module))


def _reset_stats(skeleton: nn.Module, count: int, dtype: torch.dtype, device: torch.device) -> Dict[str, torch.Tensor]:
    """Fresh stacked ``[count, ...]`` running statistics, as ``reset_running_stats`` leaves them."""
    stats: Dict[str, torch.Tensor] = {}
    for prefix, layer in _tracking_batchnorms(skeleton):
        prefix = f"{prefix}." if prefix else ""
        shape = (count, *layer.running_mean.shape)
        stats[prefix + "running_mean"] = torch.zeros(shape, dtype=dtype, device=device)
        stats[prefix + "running_var"] = torch.ones(shape, dtype=dtype, device=device)
        if layer.num_batches_tracked is not None:
            stats[prefix + "num_batches_tracked"] = torch.zeros(count, dtype=torch.long, device=device)
    return stats


@torch.no_grad()
def recompute_bn(
    skeleton: nn.Module,
    rows: torch.Tensor,
    data: Data,
    *,
    space: Optional[ParamSpace] = None,
    max_batches: Optional[int] = None,
    chunk_size: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
    argument: str = "data",
) -> Dict[str, torch.Tensor]:
    """BatchNorm running statistics of every row of ``rows``, over ``data``, in one pass.

    Args:
        skeleton: a module of the architecture; its parameters and buffers are not changed (its
            BatchNorm momenta and train/eval flags are changed during the call and restored).
        rows: ``[K, P]`` bank (or one ``[P]`` row) in ``space``'s layout.
        data: ``(x, y)`` batches, see the module docstring; ``y`` is ignored.
        space: layout of the rows; ``ParamSpace(skeleton)`` when omitted.
        max_batches: use only the first ``max_batches`` batches.
        chunk_size: models per vmapped call; by default as many as fit ``memory_budget_bytes``.
        memory_budget_bytes: budget of one vmapped call (default: 1 GiB on CPU, half the free
            memory on an accelerator).
        argument: the name of ``data`` in error messages.

    Returns:
        ``{buffer name: [K, ...]}`` (no leading ``K`` for a ``[P]`` row) with ``running_mean``,
        ``running_var`` and ``num_batches_tracked`` of every BatchNorm layer, named as in
        ``skeleton.state_dict()``; ``{}`` at once when the skeleton has no such layer.

    Batch ``i`` is folded in with momentum ``1 / (i + 1)``: each batch weighs the same, exactly as
    ``update_bn`` (``momentum=None``) does. Unlike ``update_bn``, only the BatchNorm layers run in
    train mode (dropout stays off), so the result is deterministic; for models without stochastic
    layers the two agree.
    """
    space, bank, single = check_bank(skeleton, rows, space, "rows")
    if not has_batchnorm(skeleton):
        return {}
    stats = _reset_stats(skeleton, bank.shape[0], bank.dtype, bank.device)
    run_bank(
        skeleton, space, bank, stats, data,
        accumulate_batchnorm=True, argument=argument, max_batches=max_batches,
        chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
    )
    if single:
        return {name: value[0] for name, value in stats.items()}
    return stats


# -- running a bank of rows over data (shared with starfast.barrier) -------------------------------


@torch.no_grad()
def run_bank(
    skeleton: nn.Module,
    space: ParamSpace,
    bank: torch.Tensor,
    buffers: Mapping[str, torch.Tensor],
    data: Data,
    *,
    on_outputs: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
    accumulate_batchnorm: bool = False,
    argument: str = "data",
    max_batches: Optional[int] = None,
    chunk_size: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
) -> int:
    """Run every row of ``bank`` ``[K, P]`` on every batch of ``data``; returns the batch count.

    ``buffers`` holds per-model ``[K, ...]`` buffers; the skeleton's other buffers are shared by
    all models. Models run ``chunk_size`` at a time under one ``vmap`` (by default as many as fit
    ``memory_budget_bytes``, see :func:`_models_per_budget`, except convolutional models on the
    CPU, which run one at a time); a chunk of one model runs as a plain ``functional_call``. ``on_outputs(outputs [K, B, ...], y)``
    receives each batch's outputs of all ``K`` models (``x`` and ``y`` moved to the bank's device,
    floating ``x`` cast to its dtype).

    The skeleton runs in eval mode. With ``accumulate_batchnorm`` its BatchNorm layers run in
    train mode instead, with momentum ``1 / (i + 1)`` on batch ``i``: the running statistics in
    ``buffers`` become the equal-weight average over the batches (updated in place). Modes and
    momenta are restored afterwards. Raises ``ValueError`` naming ``argument`` when the data is
    empty.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive number of batches, got {max_batches}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of models, got {chunk_size}")
    if memory_budget_bytes is not None and memory_budget_bytes < 1:
        raise ValueError(f"memory_budget_bytes must be a positive number of bytes, got {memory_budget_bytes}")
    count = bank.shape[0]
    params = space.views(bank)
    shared = {name: buffer.to(bank.device) for name, buffer in skeleton.named_buffers() if name not in buffers}

    def forward(params: Dict[str, torch.Tensor], buffers: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(skeleton, (params, buffers, shared), (x,))

    vmapped_forward = vmap(forward, in_dims=(0, 0, None))

    def run_window(first: int, size: int, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[size, B, ...]`` of models ``first .. first + size - 1``. The buffer slices are
        views, so BatchNorm's in-place updates land in ``buffers``."""
        if min(size, count - first) == 1:
            # One model needs no vmap, whose batching rules (grouped convolutions, decomposed
            # BatchNorm) only pay off for several.
            return forward(_pick(params, first), _pick(buffers, first), x).unsqueeze(0)
        return vmapped_forward(_window(params, first, size), _window(buffers, first, size), x)
    layers = [layer for _, layer in _tracking_batchnorms(skeleton)] if accumulate_batchnorm else []
    momenta = {layer: layer.momentum for layer in layers}
    modes = {module: module.training for module in skeleton.modules()}
    per_call = chunk_size
    if per_call is None and bank.device.type == "cpu" and _has_convolutions(skeleton):
        # On the CPU vmap's batching rule for convolutions (one grouped convolution) is slower
        # than running the models one after another (benchmarks/RESULTS.md); GPUs gain from it.
        per_call = 1
    seen = 0
    try:
        skeleton.eval()
        for layer in layers:
            layer.train()
        for x, y in iterate_batches(data, argument):
            x = x.to(device=bank.device, dtype=bank.dtype if x.is_floating_point() else x.dtype)
            y = y.to(bank.device)
            for layer in layers:
                layer.momentum = 1.0 / (seen + 1)
            outputs, start = [], 0
            if per_call is None:
                # The first model runs alone on the first batch, measured, to size the chunks.
                with _largest_leaf_output(skeleton) as largest:
                    outputs.append(run_window(0, 1, x))
                per_call = _models_per_budget(largest[0], x, count, memory_budget_bytes)
                start = 1
            outputs += [run_window(first, per_call, x) for first in range(start, count, per_call)]
            if on_outputs is not None:
                on_outputs(outputs[0] if len(outputs) == 1 else torch.cat(outputs), y)
            seen += 1
            if max_batches is not None and seen >= max_batches:
                break
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    if seen == 0:
        raise ValueError(f"{argument} yielded no batches; pass a non-empty dataset of (x, y) batches")
    return seen


def check_bank(
    skeleton: nn.Module, rows: torch.Tensor, space: Optional[ParamSpace], argument: str
) -> Tuple[ParamSpace, torch.Tensor, bool]:
    """The layout (``ParamSpace(skeleton)`` unless given), ``rows`` as a ``[K, P]`` bank, and
    whether ``rows`` was a single ``[P]`` row; clear errors when they do not fit the skeleton."""
    if space is None:
        space = ParamSpace(skeleton)
    else:
        space.check_compatible(skeleton, "skeleton")
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{argument} must be a tensor of flat rows [K, P] or [P], got {type(rows).__name__}")
    if rows.dim() not in (1, 2) or rows.shape[-1] != space.size or rows.numel() == 0:
        raise ValueError(
            f"{argument} has shape {list(rows.shape)} but this architecture has P = {space.size} parameters; "
            f"pass [K, {space.size}] or [{space.size}] rows made with ParamSpace(skeleton)"
        )
    if not rows.is_floating_point():
        raise TypeError(f"{argument} must be floating point, got {rows.dtype}")
    return (space, rows.unsqueeze(0), True) if rows.dim() == 1 else (space, rows, False)


def iterate_batches(data: Data, argument: str = "data") -> Iterator[Batch]:
    """The ``(x, y)`` batches of ``data`` (a callable giving a fresh iterable, or a re-iterable).

    ``argument`` names the caller's argument in error messages.
    """
    if isinstance(data, Iterator):
        raise TypeError(
            f"{argument} is a one-shot iterator; pass a callable returning a fresh iterable "
            f"(e.g. lambda: ds.eval_batches('train', 256)) or a re-iterable (a list of batches, a DataLoader)"
        )
    source = data() if callable(data) else data
    try:
        batches = iter(source)
    except TypeError:
        raise TypeError(
            f"{argument} must be a callable returning an iterable of (x, y) batches, or a re-iterable of "
            f"them; got {type(data).__name__}"
        ) from None
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
            raise TypeError(f"{argument} must yield (x, y) pairs of tensors, got a {type(batch).__name__}")
        yield batch[0], torch.as_tensor(batch[1])


@contextmanager
def _largest_leaf_output(skeleton: nn.Module) -> Iterator[List[int]]:
    """Within the block, ``largest[0]`` tracks the bytes of the largest output of any leaf module
    of ``skeleton`` (per model: inside ``vmap`` tensors show their per-model shape)."""
    largest = [0]

    def measure(module: nn.Module, inputs, output) -> None:
        tensors = output if isinstance(output, (tuple, list)) else (output,)
        produced = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        largest[0] = max(largest[0], produced)

    leaves = [module for module in skeleton.modules() if next(module.children(), None) is None]
    hooks = [leaf.register_forward_hook(measure) for leaf in leaves]
    try:
        yield largest
    finally:
        for hook in hooks:
            hook.remove()


def _has_convolutions(module: nn.Module) -> bool:
    return any(isinstance(layer, nn.modules.conv._ConvNd) for layer in module.modules())


def _models_per_budget(largest_output: int, x: torch.Tensor, count: int, memory_budget_bytes: Optional[int]) -> int:
    """How many models one vmapped call may run: the budget over one model's peak, taken as
    ``LIVE_ACTIVATIONS`` times its largest module output plus the input; in ``[1, count]``."""
    budget = memory_budget_bytes if memory_budget_bytes is not None else _default_budget(x.device)
    per_model = LIVE_ACTIVATIONS * largest_output + x.numel() * x.element_size()
    return int(max(1, min(count, budget // max(1, per_model))))


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_ACCELERATOR_FREE_FRACTION)
    return DEFAULT_CPU_BUDGET_BYTES


def _window(tensors: Mapping[str, torch.Tensor], start: int, size: int) -> Dict[str, torch.Tensor]:
    return {name: tensor[start : start + size] for name, tensor in tensors.items()}


def _pick(tensors: Mapping[str, torch.Tensor], index: int) -> Dict[str, torch.Tensor]:
    return {name: tensor[index] for name, tensor in tensors.items()}
