"""Inputs and mismatch messages for comparing the compiled ops with their references, shared by
tests/test_ops.py and ``python -m starfast.check``."""
import torch


def block_index(length: int, rng: torch.Generator) -> torch.Tensor:
    """A realistic index map: contiguous blocks (rows of weight matrices) moved as a whole."""
    block = 7
    blocks = torch.randperm(length // block, generator=rng)
    index = (blocks.unsqueeze(1) * block + torch.arange(block)).reshape(-1)
    return torch.cat([index, torch.arange(index.numel(), length)])


def mismatches(got: torch.Tensor, want: torch.Tensor) -> str:
    """How many elements of ``got`` differ from ``want``, with the first few of them."""
    differ = got != want
    return f"{int(differ.sum())} of {got.numel()} elements differ, e.g. {got[differ][:3].tolist()} vs {want[differ][:3].tolist()}"
