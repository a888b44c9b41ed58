"""What both trainers share — regular training (:mod:`starfast.training`) and Starlight
(:mod:`starfast.starlight`) — and the loss the barrier code measures.

- Random streams. A seed drives independent streams, each seeded by :func:`stream_seed` from
  numpy's ``SeedSequence([seed, *stream])``; every trainer names its own streams
  (:class:`RegularStream`, :class:`StarStream`), so no two trainers can mix them up. A trainer's
  global RNG (dropout) is forked and seeded with :func:`forked_global_rng` /
  :func:`seed_global_rng`.
- :func:`steps_per_epoch`: full batches per epoch (per process under ``torch.distributed``).
- :func:`resume_checkpoint`: the checkpoint at a path, refused (naming the setting) when it was
  written for other settings.
- :func:`per_example_loss` and :func:`is_correct`: cross-entropy on ``C`` logits, or BCE on one
  logit for binary tasks; accuracy likewise.
"""
from __future__ import annotations

import contextlib
import enum
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from starfast.files import StoredFileError, load_checkpoint


class RegularStream(enum.IntEnum):
    """The random streams of a regular model's seed."""

    INIT = 0  # the module's initial weights
    DATA = 1  # batch order and augmentation
    DROPOUT = 2  # the global RNG while training


class StarStream(enum.IntEnum):
    """The random streams of a star's seed (each further keyed by epoch, and rank where noted)."""

    # 0 is unused (it seeded θ₀ before θ₀ became the caller's): the others keep their seeds
    SAMPLE = 1  # the draws of (n, t); per epoch and rank
    DATA = 2  # batch order and augmentation; per epoch, shared by the ranks
    DROPOUT = 3  # the global RNG; per epoch and rank
    MATCH = 4  # the matcher's random tie-breaking; per re-match


def stream_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for the random stream ``(seed, *stream)``, e.g. ``(seed, StarStream.SAMPLE, epoch, rank)``."""
    high, low = np.random.SeedSequence([seed, *(int(part) for part in stream)]).generate_state(2, dtype=np.uint32)
    return (int(high) << 32 | int(low)) >> 1


def cuda_indices(device: torch.device) -> List[int]:
    """The CUDA device indices whose RNG a trainer on ``device`` uses (none on the CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def seed_global_rng(value: int, devices: List[int]) -> None:
    """Seed the global CPU generator and those of the CUDA ``devices`` with ``value``."""
    torch.default_generator.manual_seed(value)
    for index in devices:
        torch.cuda.default_generators[index].manual_seed(value)


@contextlib.contextmanager
def forked_global_rng(device: torch.device, value: Optional[int] = None) -> Iterator[List[int]]:
    """Fork the global RNG (CPU and ``device``), seeded with ``value`` if given, so the caller's
    random state is neither used nor changed; yields the CUDA indices for :func:`seed_global_rng`."""
    devices = cuda_indices(device)
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        if value is not None:
            seed_global_rng(value, devices)
        yield devices


def steps_per_epoch(dataset, batch_size: int, world_size: int = 1) -> int:
    """Full batches per epoch and process (the last partial batch is dropped)."""
    steps = (dataset.num_train // batch_size) // world_size
    if steps == 0:
        processes = f" on {world_size} processes" if world_size > 1 else ""
        raise ValueError(
            f"--batch-size {batch_size}{processes} needs at least {batch_size * world_size} training examples; "
            f"{dataset.name} has {dataset.num_train}"
        )
    return steps


def resume_checkpoint(
    path: Optional[Path], identity: Mapping[str, Any], stored_identity: Callable[[Dict[str, Any]], Mapping[str, Any]], what: str
) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path`` (``None`` when there is none); a checkpoint whose
    ``stored_identity(state)`` differs from ``identity`` is refused, naming the first difference."""
    if path is None or not path.exists():
        return None
    state = load_checkpoint(path)
    stored = stored_identity(state)
    for key, value in identity.items():
        if stored.get(key) != value:
            raise StoredFileError(
                f"{what} {path} was written for {key} = {stored.get(key)!r}, not {value!r}; delete it to restart "
                f"that training, or use the same settings"
            )
    return state


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, binary: bool, label_smoothing: float = 0.0) -> torch.Tensor:
    """Loss of each example (any leading dims): BCE-with-logits on one logit, else cross-entropy.
    Half-precision logits (autocast) are upcast to float32; float64 stays float64."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if binary:
        targets = labels.to(logits.dtype) * (1 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), targets, reduction="none")
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", label_smoothing=label_smoothing
    )
    return flat.view(labels.shape)


def is_correct(logits: torch.Tensor, labels: torch.Tensor, binary: bool) -> torch.Tensor:
    """Whether each prediction is right: the logit's sign for binary tasks, else the argmax."""
    predictions = (logits.squeeze(-1) > 0).long() if binary else logits.argmax(-1)
    return predictions == labels
