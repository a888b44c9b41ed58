"""Random inputs with random labels, of any shape: a stand-in dataset for benchmarks.

Inputs are standard normal float32 (already "normalised"), labels uniform over
`num_classes`; both splits come from one CPU generator seeded with `seed` (train first).
Nothing here is learnable beyond memorisation; use it to time code, not to study models.
"""
from __future__ import annotations

from typing import Sequence

import torch

from starfast.data.dataset import TensorDataset


def load_synthetic(device: torch.device | str = "cpu", *, shape: Sequence[int] = (3, 32, 32),
                   num_classes: int = 10, num_train: int = 2048, num_test: int = 512,
                   seed: int = 0) -> TensorDataset:
    """`num_train` + `num_test` random examples of per-example `shape` (channels first)."""
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, count in (("num_train", num_train), ("num_test", num_test)):
        if count < 1:
            raise ValueError(f"{name} must be a positive int, got {count}")
    generator = torch.Generator().manual_seed(seed)

    def draw(count: int):
        inputs = torch.randn((count,) + shape, generator=generator)
        return inputs, torch.randint(0, num_classes, (count,), generator=generator)

    train_inputs, train_labels = draw(num_train)
    test_inputs, test_labels = draw(num_test)
    return TensorDataset("synthetic", train_inputs, train_labels, test_inputs, test_labels,
                         num_classes=num_classes, device=device)
