"""ImageNet (ILSVRC-2012) read from an ImageFolder tree with the paper's transforms.

Needs torchvision (imported only when loading). The tree is `<root>/train/<class>/*` and
`<root>/val/<class>/*`, where `<root>` is `data_dir` itself if it holds `train/` and `val/`,
else `<data_dir>/imagenet` (`data_dir` defaults as in `storage.resolve_data_dir`).

Transforms (paper, Appendix B.1): training images are resized to 256x256, mirrored at random
and a random 224x224 region is cropped; evaluation images are resized to 256x256 and
centre-cropped to 224x224; all are normalised with ImageNet statistics. Images are decoded
and transformed by DataLoader worker processes on the CPU; batches are moved to `device`.
Shuffling and the workers' random seeds derive from the `generator` given to
`train_batches`, so an epoch is reproducible for a fixed `num_workers >= 1`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from starfast.data.dataset import (IMAGENET_MEAN, IMAGENET_STD, Batch, Dataset,
                                   check_batch_size, check_split, generator_device)
from starfast.data.storage import PathLike, resolve_data_dir

RESIZE = (256, 256)
CROP = 224


class _TransformedFolder(torch.utils.data.Dataset):
    """One scanned ImageFolder seen through a given transform (train and eval share the scan)."""

    def __init__(self, folder, transform: Callable):
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image, label = self.folder[index]
        return self.transform(image), label


class ImageFolderDataset(Dataset):
    """A train/val ImageFolder pair streamed through DataLoader workers."""

    def __init__(self, name: str, root: Path, device: torch.device | str, num_workers: int):
        from torchvision import datasets, transforms

        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.folders = {"train": datasets.ImageFolder(str(root / "train")),
                        "test": datasets.ImageFolder(str(root / "val"))}
        if self.folders["train"].classes != self.folders["test"].classes:
            raise ValueError(f"{root}: train/ and val/ must hold the same class directories")
        normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_transform = transforms.Compose([
            transforms.Resize(RESIZE), transforms.RandomHorizontalFlip(),
            transforms.RandomCrop(CROP), transforms.ToTensor(), normalise])
        self.eval_transform = transforms.Compose([
            transforms.Resize(RESIZE), transforms.CenterCrop(CROP), transforms.ToTensor(),
            normalise])
        self.name = name
        self.num_classes = len(self.folders["train"].classes)
        self.input_shape = (3, CROP, CROP)
        self.binary = False
        self.num_train = len(self.folders["train"])
        self.num_test = len(self.folders["test"])
        self.device = torch.device(device)
        self.num_workers = num_workers

    def _batches(self, split: str, transform: Callable, batch_size: int, drop_last: bool,
                 shuffle_with: Optional[torch.Generator]) -> Iterator[Batch]:
        """Batches of `split` on `device`; shuffled (and worker-seeded) by `shuffle_with` if any."""
        loader = DataLoader(_TransformedFolder(self.folders[split], transform),
                            batch_size=batch_size, shuffle=shuffle_with is not None,
                            generator=shuffle_with, drop_last=drop_last,
                            num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        for inputs, labels in loader:
            yield (inputs.to(self.device, non_blocking=True),
                   labels.to(self.device, dtype=torch.int64, non_blocking=True))

    def train_batches(self, batch_size: int, generator: Optional[torch.Generator] = None,
                      augment: bool = True, drop_last: bool = True) -> Iterator[Batch]:
        """One shuffled epoch. A seed drawn now from `generator` (any device; None: torch's
        global RNG) drives the order and the workers' augmentation RNGs; with
        `num_workers=0` augmentation uses the global RNG of this process instead."""
        check_batch_size(batch_size)
        epoch_seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                       device=generator_device(generator)))
        loader_generator = torch.Generator().manual_seed(epoch_seed)
        transform = self.train_transform if augment else self.eval_transform
        return self._batches("train", transform, batch_size, drop_last, loader_generator)

    def eval_batches(self, split: str = "train", batch_size: int = 1000) -> Iterator[Batch]:
        check_split(split)
        check_batch_size(batch_size)
        return self._batches(split, self.eval_transform, batch_size, drop_last=False,
                             shuffle_with=None)

    def tensors(self, split: str) -> Batch:
        check_split(split)
        raise RuntimeError(f"{self.name} is too large to hold as one tensor "
                          f"({getattr(self, 'num_' + split)} images); iterate eval_batches instead")


def load_imagenet(data_dir: Optional[PathLike] = None, device: torch.device | str = "cpu", *,
                  num_workers: int = 8) -> ImageFolderDataset:
    """ImageNet from `data_dir` (see module docstring), decoded by `num_workers` processes."""
    try:
        import torchvision  # noqa: F401  (only checks availability; used by ImageFolderDataset)
    except ImportError as error:
        raise ImportError("the 'imagenet' dataset needs torchvision (ImageFolder and the image "
                          "transforms): install the torchvision build matching your torch"
                          ) from error
    base = resolve_data_dir(data_dir)
    candidates = [base, base / "imagenet"]
    for root in candidates:
        if (root / "train").is_dir() and (root / "val").is_dir():
            return ImageFolderDataset("imagenet", root, device, num_workers)
    raise FileNotFoundError(f"imagenet: no train/ and val/ class directories in "
                            f"{' or '.join(str(c) for c in candidates)}; pass data_dir=<root of "
                            f"the ImageFolder tree> or set STARFAST_DATA")
