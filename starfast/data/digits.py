"""scikit-learn's bundled 8x8 handwritten digits: the small, offline default dataset.

1797 images with values 0..16, ten classes. Inputs are scaled to [0, 1] and then standardised
with the mean and standard deviation of all train pixels (one scalar each, so the always-blank
border pixels stay finite). The train/test split is stratified by class and fixed by
`split_seed`. No augmentation.
"""
from __future__ import annotations

import torch

from starfast.data.dataset import TensorDataset

INPUT_SHAPE = (1, 8, 8)
MAX_PIXEL_VALUE = 16.0


def load_digits(device: torch.device | str = "cpu", *, split_seed: int = 0,
                test_fraction: float = 0.2) -> TensorDataset:
    """The digits task split into `1 - test_fraction` train and `test_fraction` test images."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("the 'digits' dataset needs scikit-learn, a dependency of starfast that is "
                          "missing here: pip install scikit-learn") from error
    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32) / MAX_PIXEL_VALUE
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    train_index, test_index = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=split_seed,
        stratify=labels.numpy())
    train_index, test_index = torch.from_numpy(train_index), torch.from_numpy(test_index)
    train_images = images[train_index]
    mean, std = train_images.mean(), train_images.std()

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).reshape((-1,) + INPUT_SHAPE).contiguous()

    return TensorDataset("digits", standardise(train_images), labels[train_index],
                         standardise(images[test_index]), labels[test_index], num_classes=10,
                         device=device)
