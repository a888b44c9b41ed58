"""The `Dataset` contract every loader returns, and its device-resident implementation.

Training, BatchNorm recomputation and barrier evaluation consume data only through `Dataset`:
`train_batches` (one shuffled, augmented epoch), `eval_batches` (fixed order, never augmented)
and `tensors` (a whole split). `TensorDataset` holds both splits on the target device from load
time; inputs are either stored ready to use (float32, already normalised) or raw (e.g. uint8
pixels) together with a `ChannelNormalisation` applied per batch on the device. Augmentations
are `Augmentation` objects whose random parameters are drawn once per epoch, so a seeded
generator reproduces batches and augmentation exactly.
"""
from __future__ import annotations

import abc
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

Batch = Tuple[Tensor, Tensor]
SPLITS = ("train", "test")
# torchvision's ImageNet channel statistics of [0, 1] images; the paper normalises both CIFAR
# and ImageNet with them (Appendix B.1).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def generator_device(generator: Optional[torch.Generator]) -> torch.device:
    """The device random numbers must be drawn on to use `generator` (CPU for the default RNG)."""
    return torch.device("cpu") if generator is None else generator.device


def check_split(split: str) -> None:
    """Raise ValueError unless `split` is 'train' or 'test'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_batch_size(batch_size: int) -> None:
    """Raise ValueError unless `batch_size` is a positive int."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


class Dataset(abc.ABC):
    """A classification task: a train and a test split of (input, label) pairs on `device`.

    Inputs come out as float32 normalised tensors of shape `[B, *input_shape]`, labels as int64
    in `[0, num_classes)`. Binary tasks (`binary=True`) still have `num_classes == 2` with labels
    in {0, 1}.
    """

    name: str
    num_classes: int
    input_shape: Tuple[int, ...]
    binary: bool
    num_train: int
    num_test: int
    device: torch.device

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    def __len__(self) -> int:
        return self.num_train

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, "
                f"input_shape={self.input_shape}, num_train={self.num_train}, "
                f"num_test={self.num_test}, device={str(self.device)!r})")

    @abc.abstractmethod
    def train_batches(self, batch_size: int, generator: Optional[torch.Generator] = None,
                      augment: bool = True, drop_last: bool = True) -> Iterator[Batch]:
        """One epoch over the train split in an order (and augmentation) drawn from `generator`."""

    def stacked_train_batches(self, batch_size: int, generators: Sequence[Optional[torch.Generator]],
                              augment: bool = True, drop_last: bool = True) -> Iterator[Batch]:
        """One epoch per generator, advanced together: inputs `[K, B, ...]` and labels `[K, B]`,
        where row k is exactly the batch `train_batches(batch_size, generators[k])` yields."""
        epochs = (self.train_batches(batch_size, generator, augment, drop_last) for generator in generators)
        for batches in zip(*epochs):
            yield torch.stack([inputs for inputs, _ in batches]), torch.stack([labels for _, labels in batches])

    @abc.abstractmethod
    def eval_batches(self, split: str = "train", batch_size: int = 1000) -> Iterator[Batch]:
        """The whole split, un-augmented, in fixed order (each example exactly once)."""

    @abc.abstractmethod
    def tensors(self, split: str) -> Batch:
        """The whole split as one (inputs, labels) pair, normalised and un-augmented."""


class ChannelNormalisation:
    """Maps raw inputs to float32 `(raw * value_scale - mean[c]) / std[c]` per channel c.

    `value_scale` converts stored values to the range the statistics refer to (1/255 for uint8
    pixels against statistics of [0, 1] images).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], value_scale: float = 1.0):
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need one entry per channel, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std entries must be positive, got {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.value_scale = float(value_scale)
        self._affine: Dict[torch.device, Tuple[Tensor, Tensor]] = {}

    def _scale_and_shift(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        # Built once per device, so normalising a batch never copies constants to the device.
        if device not in self._affine:
            std = torch.tensor(self.std, dtype=torch.float64)
            mean = torch.tensor(self.mean, dtype=torch.float64)
            self._affine[device] = ((self.value_scale / std).to(device, torch.float32),
                                    (-mean / std).to(device, torch.float32))
        return self._affine[device]

    def __call__(self, raw: Tensor) -> Tensor:
        channels = len(self.mean)
        if raw.dim() < 2 or raw.shape[1] != channels:
            raise ValueError(f"expected inputs [B, {channels}, ...], got {tuple(raw.shape)}")
        view = (1, channels) + (1,) * (raw.dim() - 2)
        scale, shift = self._scale_and_shift(raw.device)
        # One fused multiply-add per element: raw * (value_scale / std) - mean / std.
        return torch.addcmul(shift.view(view), raw.to(torch.float32), scale.view(view))


class Augmentation(abc.ABC):
    """A random, per-example input transformation split into drawing and applying.

    `sample` draws the parameters of `count` examples (one row each) from `generator`;
    `apply` transforms a batch of raw inputs with given rows of parameters, without randomness,
    so its result can be checked against a reference for the very same parameters.
    """

    @abc.abstractmethod
    def sample(self, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Parameters for `count` examples, a tensor with `count` rows on the generator's device."""

    @abc.abstractmethod
    def apply(self, inputs: Tensor, params: Tensor) -> Tensor:
        """Transform raw `inputs` [B, ...] with `params` [B, ...] (same device)."""


class TensorDataset(Dataset):
    """A dataset whose splits live on `device` as whole tensors.

    `train_inputs`/`test_inputs` are stored as given: float32 values already normalised when
    `normalisation` is None, otherwise raw values (uint8 pixels, say) that `normalisation` maps
    to float32 per batch. `augmentation`, if any, acts on raw train inputs before normalisation.
    """

    def __init__(self, name: str, train_inputs: Tensor, train_labels: Tensor,
                 test_inputs: Tensor, test_labels: Tensor, num_classes: int,
                 device: torch.device | str = "cpu", *, binary: bool = False,
                 normalisation: Optional[ChannelNormalisation] = None,
                 augmentation: Optional[Augmentation] = None):
        device = torch.device(device)
        splits = {"train": (train_inputs, train_labels), "test": (test_inputs, test_labels)}
        for split, (inputs, labels) in splits.items():
            if inputs.shape[1:] != train_inputs.shape[1:]:
                raise ValueError(f"{name}: {split} inputs have per-example shape "
                                 f"{tuple(inputs.shape[1:])}, train inputs have "
                                 f"{tuple(train_inputs.shape[1:])}")
            if labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
                raise ValueError(f"{name}: {split} labels must be 1-D with one entry per input, "
                                 f"got {tuple(labels.shape)} for {inputs.shape[0]} inputs")
            if normalisation is None and inputs.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"{name}: {split} inputs must be float32 (or float64, for exact "
                                 f"comparisons) when no normalisation is given, got {inputs.dtype}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(f"{name}: {split} labels must lie in [0, {num_classes}), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
        if binary and num_classes != 2:
            raise ValueError(f"{name}: a binary dataset has num_classes=2, got {num_classes}")

        self.name = name
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in train_inputs.shape[1:])
        self.binary = bool(binary)
        self.num_train = int(train_inputs.shape[0])
        self.num_test = int(test_inputs.shape[0])
        self.device = device
        self.normalisation = normalisation
        self.augmentation = augmentation
        self._inputs = {s: x.to(device) for s, (x, _) in splits.items()}
        self._labels = {s: y.to(device=device, dtype=torch.int64) for s, (_, y) in splits.items()}

    def _ready(self, raw: Tensor) -> Tensor:
        return raw if self.normalisation is None else self.normalisation(raw)

    def train_batches(self, batch_size: int, generator: Optional[torch.Generator] = None,
                      augment: bool = True, drop_last: bool = True) -> Iterator[Batch]:
        """One epoch over the train split: shuffled, augmented (if the dataset has augmentation
        and `augment`), normalised, on `device`.

        All randomness is drawn from `generator` when this method is called, not while
        iterating: first `torch.randperm(num_train)`, then `augmentation.sample(num_train)`,
        both on the generator's device (a CPU generator works for any `device`; None uses
        torch's global RNG). Equal generator states therefore give identical epochs, even if
        the caller draws from the same generator between batches. With `drop_last` the final
        partial batch is skipped.
        """
        check_batch_size(batch_size)
        order, params = self._draw_epoch(generator, augment)
        return self._epoch(order, params, batch_size, drop_last)

    def stacked_train_batches(self, batch_size: int, generators: Sequence[Optional[torch.Generator]],
                              augment: bool = True, drop_last: bool = True) -> Iterator[Batch]:
        """As `Dataset.stacked_train_batches`, with one gather (and one augmentation and
        normalisation call) per step for all K epochs instead of K."""
        check_batch_size(batch_size)
        if not generators:
            raise ValueError("stacked_train_batches needs at least one generator")
        drawn = [self._draw_epoch(generator, augment) for generator in generators]
        orders = torch.stack([order for order, _ in drawn])
        params = None if drawn[0][1] is None else torch.stack([p for _, p in drawn])
        return self._epoch(orders, params, batch_size, drop_last)

    def _draw_epoch(self, generator: Optional[torch.Generator], augment: bool) -> Tuple[Tensor, Optional[Tensor]]:
        draw_on = generator_device(generator)
        order = torch.randperm(self.num_train, generator=generator, device=draw_on).to(self.device)
        params = None
        if augment and self.augmentation is not None:
            params = self.augmentation.sample(self.num_train, generator).to(self.device)
        return order, params

    def _epoch(self, order: Tensor, params: Optional[Tensor], batch_size: int,
               drop_last: bool) -> Iterator[Batch]:
        """Batches of `order` ([N], or [K, N] for K epochs at once: then [K, B, ...] batches)."""
        inputs, labels = self._inputs["train"], self._labels["train"]
        stop = self.num_train - self.num_train % batch_size if drop_last else self.num_train
        stacked = order.dim() - 1  # 0 or 1 leading epoch dims
        for start in range(0, stop, batch_size):
            size = min(batch_size, stop - start)
            index = order.narrow(-1, start, size)
            raw = inputs[index.reshape(-1)]
            if params is not None:
                raw = self.augmentation.apply(raw, params.narrow(stacked, start, size).flatten(0, stacked))
            yield self._ready(raw).unflatten(0, index.shape), labels[index]

    def eval_batches(self, split: str = "train", batch_size: int = 1000) -> Iterator[Batch]:
        """The split in stored order, un-augmented and normalised; the last batch may be short."""
        check_split(split)
        check_batch_size(batch_size)
        return self._in_order(split, batch_size)

    def _in_order(self, split: str, batch_size: int) -> Iterator[Batch]:
        inputs, labels = self._inputs[split], self._labels[split]
        for start in range(0, inputs.shape[0], batch_size):
            yield self._ready(inputs[start:start + batch_size]), labels[start:start + batch_size]

    def tensors(self, split: str) -> Batch:
        """The whole split, normalised and un-augmented.

        Without a normalisation step these are the stored tensors themselves (no copy; do not
        modify them in place); raw-stored datasets materialise a float32 copy.
        """
        check_split(split)
        return self._ready(self._inputs[split]), self._labels[split]

    def subset(self, num_train: int, num_test: int) -> "TensorDataset":
        """The first `num_train` train and `num_test` test examples (all of a smaller split), with
        the same name, normalisation and augmentation: what smoke runs (`--smoke`) train on."""
        if num_train < 1 or num_test < 1:
            raise ValueError(f"a subset needs at least one example per split, got {num_train} and {num_test}")
        return TensorDataset(self.name, self._inputs["train"][:num_train], self._labels["train"][:num_train],
                             self._inputs["test"][:num_test], self._labels["test"][:num_test], self.num_classes,
                             self.device, binary=self.binary, normalisation=self.normalisation,
                             augmentation=self.augmentation)
