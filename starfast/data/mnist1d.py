"""MNIST-1D (Greydanus, 2020): ten classes of 40-sample 1-D signals, generated offline.

Needs the `mnist1d` package (`pip install mnist1d`), whose generator we call directly, so
nothing is downloaded. Its defaults give the reference dataset: 5000 signals, 80% train, seed
42. Signals are standardised by the package (over the whole generated set) and shaped
(1, 40) as single-channel sequences. No augmentation.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from starfast.data.dataset import TensorDataset

SIGNAL_LENGTH = 40


def load_mnist1d(device: torch.device | str = "cpu", *, num_samples: int = 5000,
                 train_split: float = 0.8, seed: int = 42) -> TensorDataset:
    """Generate `num_samples` MNIST-1D signals and split the first `train_split` off as train."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError("the 'mnist1d' dataset needs the mnist1d package: "
                          "pip install mnist1d") from error
    if num_samples < 20:
        raise ValueError(f"num_samples must be >= 20 (two per class), got {num_samples}")
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split must lie strictly between 0 and 1, got {train_split}")
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    # The generator reseeds Python's and NumPy's global RNGs; restore them for our callers.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    def as_tensors(inputs: np.ndarray, labels: np.ndarray):
        signals = torch.from_numpy(np.asarray(inputs, dtype=np.float32))
        return signals.reshape(-1, 1, SIGNAL_LENGTH), torch.from_numpy(np.asarray(labels, np.int64))

    train_inputs, train_labels = as_tensors(generated["x"], generated["y"])
    test_inputs, test_labels = as_tensors(generated["x_test"], generated["y_test"])
    return TensorDataset("mnist1d", train_inputs, train_labels, test_inputs, test_labels,
                         num_classes=10, device=device)
