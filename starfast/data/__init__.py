"""Datasets by name: `load(name, data_dir, device, **options)` and `names()`.

Each dataset lives in its own module with its own loader and options; this registry maps
names to loaders, passes `data_dir` only to the loaders that read files, and turns unknown
names or options into errors that list what is accepted. Every loader returns a `Dataset`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, List, Optional

import torch

from starfast.data.cifar import CIFAR10, CIFAR100, RandomCropFlip, load_cifar
from starfast.data.dataset import Augmentation, ChannelNormalisation, Dataset, TensorDataset
from starfast.data.digits import load_digits
from starfast.data.gaussians import load_gaussians
from starfast.data.imagenet import load_imagenet
from starfast.data.mnist1d import load_mnist1d
from starfast.data.storage import CorruptDataError, PathLike, resolve_data_dir
from starfast.data.synthetic import load_synthetic
from starfast.names import resolve_name

_LOADERS: Dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "gaussians": load_gaussians,
    "mnist1d": load_mnist1d,
    "cifar10": functools.partial(load_cifar, CIFAR10),
    "cifar100": functools.partial(load_cifar, CIFAR100),
    "imagenet": load_imagenet,
    "synthetic": load_synthetic,
}


def names() -> List[str]:
    """All dataset names, including those whose optional dependency is not installed here."""
    return list(_LOADERS)


def canonical_name(name: str) -> str:
    """``name`` checked (case-insensitively); ``ValueError`` with the closest name otherwise."""
    return resolve_name("dataset", name, names())


def load(name: str, data_dir: Optional[PathLike] = None, device: torch.device | str = "cpu",
         **options) -> Dataset:
    """Load dataset `name` onto `device`; `options` are the dataset's own keyword arguments.

    `data_dir` (default `$STARFAST_DATA` or `~/.cache/starfast`) matters only for datasets
    read from files (cifar10, cifar100, imagenet). A dataset whose package is missing raises
    ImportError saying what to install.
    """
    loader = _LOADERS[canonical_name(name)]
    parameters = inspect.signature(loader).parameters
    accepted = [p for p, spec in parameters.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"dataset {name!r} has no option {', '.join(unknown)}; its options are "
                        f"{', '.join(accepted) or 'none'}")
    if "data_dir" in parameters:
        options["data_dir"] = data_dir
    return loader(device=torch.device(device), **options)


__all__ = ["load", "names", "canonical_name", "Dataset", "TensorDataset", "ChannelNormalisation", "Augmentation",
           "RandomCropFlip", "CorruptDataError", "resolve_data_dir"]
