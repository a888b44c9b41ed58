"""CIFAR-10 and CIFAR-100 from the official python-version archives, with the paper's recipe.

Owns the CIFAR file format, the on-disk pipeline and the training augmentation:

- files: `cifar-10-python.tar.gz` (directory `cifar-10-batches-py`: `data_batch_1..5`,
  `test_batch`, key b'labels') and `cifar-100-python.tar.gz` (directory `cifar-100-python`:
  `train`, `test`, key b'fine_labels'), each a pickled dict with b'data' uint8 [N, 3072]
  (channel-major 32x32 images). The pickles come from the checksummed official archive (or a
  directory you extracted yourself), which is why unpickling them is acceptable.
- pipeline, in `data_dir`: the `<name>.npz` array cache if present; else the extracted
  directory; else the archive (md5-checked); else a download (md5-checked). The arrays are then
  cached as `<name>.npz` for fast reloads. See `storage` for the atomic-write guarantees.
- recipe (paper, Appendix B.1): images are normalised with ImageNet statistics, and training
  batches are augmented by a random 32x32 crop of the image zero-padded by 4 pixels plus a
  random horizontal flip, vectorised over the batch on the data's device.

Images stay uint8 [N, 3, 32, 32] on the device; normalisation happens per batch.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from starfast.data.dataset import (IMAGENET_MEAN, IMAGENET_STD, Augmentation,
                                   ChannelNormalisation, TensorDataset, generator_device)
from starfast.data.storage import (CorruptDataError, PathLike, download, extract_member_dir,
                                   load_arrays, resolve_data_dir, save_arrays, verify_md5)

CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarVariant:
    name: str
    archive: str
    url: str
    md5: str
    member_dir: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    label_key: bytes
    num_classes: int


CIFAR10 = CifarVariant(
    name="cifar10", archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a", member_dir="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
    label_key=b"labels", num_classes=10)
CIFAR100 = CifarVariant(
    name="cifar100", archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85", member_dir="cifar-100-python",
    train_files=("train",), test_files=("test",), label_key=b"fine_labels", num_classes=100)


class RandomCropFlip(Augmentation):
    """Random crop of the zero-padded image back to its size, then a random horizontal flip.

    Parameters are int64 rows `(row_offset, col_offset, flip)` with offsets in
    `[0, 2 * padding]` (the crop's top-left corner in the padded image) and flip in {0, 1}.
    Padding with zeros before normalisation matches torchvision's `RandomCrop(32, padding=4)`.
    """

    def __init__(self, padding: int = 4):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = padding

    def sample(self, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
        device = generator_device(generator)
        offsets = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=generator,
                                device=device)
        flips = torch.randint(0, 2, (count, 1), generator=generator, device=device)
        return torch.cat([offsets, flips], dim=1)

    def apply(self, inputs: Tensor, params: Tensor) -> Tensor:
        batch, channels, height, width = inputs.shape
        if params.shape != (batch, 3):
            raise ValueError(f"params must be [{batch}, 3], got {tuple(params.shape)}")
        p = self.padding
        padded = F.pad(inputs, (p, p, p, p)).reshape(batch, channels, -1)
        padded_width = width + 2 * p
        row_offset, col_offset, flip = params.unbind(dim=1)
        rows = row_offset[:, None] + torch.arange(height, device=inputs.device)
        forward = torch.arange(width, device=inputs.device)
        cols = col_offset[:, None] + torch.where(flip[:, None].bool(), width - 1 - forward, forward)
        # Flat source index of every output pixel, shared by all channels: one gather per batch.
        source = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(batch, 1, -1)
        out = torch.gather(padded, 2, source.expand(batch, channels, height * width))
        return out.reshape(batch, channels, height, width)


def load_cifar(variant: CifarVariant, data_dir: Optional[PathLike] = None,
               device: torch.device | str = "cpu", *, url: Optional[str] = None,
               md5: Optional[str] = None, download: bool = True,
               progress: bool = True) -> TensorDataset:
    """Load CIFAR `variant` from `data_dir` (see module docstring), downloading if needed.

    `url` replaces the official address (any urllib URL, e.g. `file://` for a local mirror).
    `md5` is the archive's expected checksum; it defaults to the official one when `url` is
    not given, and to no checksum check for a custom `url` (the archive is still validated
    while extracting). With `download=False` a missing archive is an error.
    """
    root = resolve_data_dir(data_dir)
    cache = root / f"{variant.name}.npz"
    if cache.is_file():
        arrays = load_arrays(cache, CACHE_ARRAYS)
    else:
        root.mkdir(parents=True, exist_ok=True)
        extracted = root / variant.member_dir
        if not extracted.is_dir():
            _fetch_and_extract(variant, root, extracted, url, md5, download, progress)
        arrays = _read_extracted(variant, extracted)
        save_arrays(cache, arrays)
    return TensorDataset(
        variant.name,
        torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"]),
        torch.from_numpy(arrays["test_images"]), torch.from_numpy(arrays["test_labels"]),
        variant.num_classes, device,
        normalisation=ChannelNormalisation(IMAGENET_MEAN, IMAGENET_STD, value_scale=1 / 255),
        augmentation=RandomCropFlip(padding=4))


def _fetch_and_extract(variant: CifarVariant, root: Path, extracted: Path, url: Optional[str],
                       md5: Optional[str], allow_download: bool, progress: bool) -> None:
    archive = root / variant.archive
    expected_md5 = md5 if md5 is not None else (variant.md5 if url is None else None)
    if archive.is_file():
        if expected_md5 is not None:
            verify_md5(archive, expected_md5)
    elif allow_download:
        download(url or variant.url, archive, expected_md5, progress)
    else:
        raise FileNotFoundError(
            f"{variant.name}: found neither {root / (variant.name + '.npz')}, {extracted} nor "
            f"{archive}; pass download=True or put {variant.archive} (from {variant.url}) there")
    extract_member_dir(archive, variant.member_dir, extracted)


def _read_extracted(variant: CifarVariant, extracted: Path) -> Dict[str, np.ndarray]:
    arrays = {}
    for split, files in (("train", variant.train_files), ("test", variant.test_files)):
        parts = [_read_batch_file(extracted / name, variant) for name in files]
        arrays[f"{split}_images"] = np.concatenate([images for images, _ in parts])
        arrays[f"{split}_labels"] = np.concatenate([labels for _, labels in parts])
    return arrays


def _read_batch_file(path: Path, variant: CifarVariant) -> Tuple[np.ndarray, np.ndarray]:
    advice = f"delete the directory {path.parent} (and re-download if needed)"
    if not path.is_file():
        raise CorruptDataError(f"{path} is missing: {path.parent} is incomplete; {advice}")
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[variant.label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise CorruptDataError(f"{path} is not a {variant.name} batch file ({error!r}); "
                               f"{advice}") from error
    pixels = int(np.prod(IMAGE_SHAPE))
    if data.ndim != 2 or data.shape[1] != pixels or labels.shape != (data.shape[0],):
        raise CorruptDataError(f"{path}: expected data [N, {pixels}] and N labels, got "
                               f"{data.shape} and {labels.shape}; {advice}")
    if labels.size and (labels.min() < 0 or labels.max() >= variant.num_classes):
        raise CorruptDataError(f"{path}: labels outside [0, {variant.num_classes}); {advice}")
    return data.reshape((-1,) + IMAGE_SHAPE), labels.astype(np.uint8)
