"""Running every row of a ``[K, P]`` bank of models over data, within a memory budget.

This module owns:

- ``run_bank``: run every row of a bank on every batch of the data, the rows as views of the bank
  passed to ``torch.func.functional_call``, several models per ``torch.func.vmap`` call: as many
  as fit a memory budget (measured on the first batch), one at a time for convolutional nets on
  the CPU. Per-model buffers are stacked ``[K, ...]``; optionally given BatchNorm layers
  accumulate equal-weight running statistics in them (what :mod:`starfast.bn` builds on).
- ``check_bank``: rows of the skeleton's architecture, as a ``[K, P]`` bank, with clear errors.
- ``iterate_batches`` and the ``Data`` type: the data interface of :mod:`starfast.bn`,
  :mod:`starfast.barrier` and :mod:`starfast.bma`.
- ``has_convolutions``: whether a module has convolutions (they decide the chunking here and
  the memory layout of training).

The data interface: ``data`` is either a callable returning a fresh iterable of ``(x, y)``
batches (e.g. ``lambda: ds.eval_batches("train", 256)``), or a re-iterable such as a list of
batches or a ``DataLoader``. A one-shot iterator (a generator object) is refused because a
barrier curve reads the training data more than once. The data should be un-augmented.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

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


@torch.no_grad()
def run_bank(
    skeleton: nn.Module,
    space: ParamSpace,
    bank: torch.Tensor,
    buffers: Mapping[str, torch.Tensor],
    data: Data,
    *,
    on_outputs: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
    accumulating_batchnorms: Sequence[_BatchNorm] = (),
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

    The skeleton runs in eval mode, except ``accumulating_batchnorms`` (BatchNorm layers of the
    skeleton): they run in train mode, with momentum ``1 / (i + 1)`` on batch ``i``, so that
    their running statistics in ``buffers`` become the equal-weight average over the batches
    (updated in place). Modes and momenta are restored afterwards. Raises ``ValueError`` naming ``argument`` when the data is
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
    layers = list(accumulating_batchnorms)
    momenta = {layer: layer.momentum for layer in layers}
    modes = {module: module.training for module in skeleton.modules()}
    per_call = chunk_size
    if per_call is None and bank.device.type == "cpu" and has_convolutions(skeleton):
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


def has_convolutions(module: nn.Module) -> bool:
    """True when ``module`` contains a convolution layer (of any dimension)."""
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
