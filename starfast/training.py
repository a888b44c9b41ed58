"""Regular (non-star) training: source and held-out models trained from a :class:`Recipe`.

This module owns

- :func:`init_model` — a seeded, freshly initialised model;
- :func:`train_model` — one seed, with per-epoch checkpoints that make an interrupted run resume
  to bit-identical weights;
- :func:`train_models_parallel` — K seeds at once: each parameter and buffer is stacked into a
  ``[K, ...]`` bank, the forward pass is ``vmap(functional_call)`` (BatchNorm running statistics
  update in their stacked buffers; MLPs run their own batched matmuls), and one fused optimizer
  steps the banks. SGD, Adam and AdamW are elementwise, so this is exactly K independent
  optimizers; each seed draws its own batches from its own generator, exactly as
  :func:`train_model` does (``Dataset.stacked_train_batches`` gathers all K in one index), so both
  paths agree to float rounding;
- :func:`evaluate`: mean loss and accuracy of a model (or K) on a split.

Seeds. A seed ``s`` drives three independent random streams
(:class:`~starfast.training_common.RegularStream`): *init* (the module is built inside
``torch.random.fork_rng`` with the CPU RNG seeded from it, so the caller's global RNG is neither used nor changed), *data* (a CPU
``torch.Generator`` handed to ``Dataset.train_batches``: batch order and augmentation, identical on
every device) and *dropout* (the global RNG, forked and seeded, for models with dropout; under
``vmap`` dropout draws differ from the sequential path). Same seed ⇒ identical weights on CPU.

Checkpoints hold the model, optimizer, data-generator and global-RNG states plus the epoch
counter; the learning rate is a pure function of progress (:meth:`Recipe.lr_at`), so the epoch is
the whole scheduler state. Parallel training writes one checkpoint per seed in the same format,
so either path resumes the other's checkpoints.

Speed options (:class:`SpeedOptions`): bf16 autocast (``precision='auto'`` means bf16 on CUDA,
fp32 on CPU), channels-last memory for conv nets on CUDA (sequential path only; a no-op on CPU),
and ``torch.compile`` of the forward pass. Data never leaves its device: batches come from the
dataset on the device it was loaded to, and the model is moved there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, vmap

from starfast.bank import has_convolutions
from starfast.files import save_checkpoint
from starfast.models import ModelSpec
from starfast.progress import progress_bar
from starfast.recipes import Recipe
from starfast.training_common import (
    RegularStream,
    forked_global_rng,
    is_correct,
    per_example_loss,
    resume_checkpoint,
    steps_per_epoch,
    stream_seed,
)

CHECKPOINT_FORMAT = 1
EVAL_BATCH_SIZE = 1000
PRECISIONS = ("auto", "bf16", "fp32")


class TrainingDiverged(RuntimeError):
    """The training loss of one seed became NaN or infinite."""

    def __init__(self, seed: int, epoch: int, loss: float, recipe: Recipe):
        self.seed, self.epoch, self.loss = seed, epoch, loss
        super().__init__(
            f"seed {seed} diverged: its training loss became {loss} in epoch {epoch} of {recipe.epochs} "
            f"(optimizer {recipe.optimizer}, lr {recipe.lr}); lower --lr or change the recipe"
        )


@dataclass(frozen=True)
class SpeedOptions:
    """How to run fast on a GPU; every option is valid (and harmless) on a CPU."""

    precision: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def autocast_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        """bf16 when asked for, or for ``auto`` on a GPU that supports it; ``None`` means fp32."""
        if self.precision == "bf16":
            return torch.bfloat16
        if self.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None


@dataclass(frozen=True)
class TrainingMetrics:
    """Final metrics of a trained model: losses/accuracies on un-augmented data in eval mode."""

    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float
    epochs: int

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def init_model(spec: ModelSpec, seed: int) -> nn.Module:
    """``spec.build()`` on the CPU with the init stream of ``seed``; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, RegularStream.INIT))
        return spec.build()


def data_generator(seed: int) -> torch.Generator:
    """The CPU generator of ``seed``'s batch order and augmentation."""
    return torch.Generator().manual_seed(stream_seed(seed, RegularStream.DATA))


FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


def make_optimizer(recipe: Recipe, parameters) -> torch.optim.Optimizer:
    """The recipe's optimizer, with torch's fused kernel (one pass per tensor instead of one per
    update term) on the devices that have it. On CPU this is what keeps a stacked ``[K, ...]``
    bank's update (``--parallel-seeds``) from being memory-bound: 0.64 ms -> 0.21 ms per step
    for 8 width-128 MLPs."""
    parameters = list(parameters)
    fused = all(p.device.type in FUSED_OPTIMIZER_DEVICES for p in parameters)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, fused=fused
        )
    adam = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return adam(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], dataset, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy of ``forward`` on a split (un-augmented, fixed order).

    ``forward`` maps a batch ``[B, ...]`` to logits ``[..., B, C]`` (extra leading dims, e.g. K
    models, give per-model results of that shape). Put modules in eval mode first.
    """
    loss_sum = correct = None
    count = 0
    for inputs, labels in dataset.eval_batches(split, EVAL_BATCH_SIZE):
        logits = forward(inputs)
        labels = labels.expand(logits.shape[:-1])
        batch_loss = per_example_loss(logits, labels, dataset.binary).sum(-1)
        batch_correct = is_correct(logits, labels, dataset.binary).sum(-1)
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        count += labels.shape[-1]
    return loss_sum / count, correct.double() / count


# -- shared pieces of both training paths ------------------------------------------------------


def _resolve_device(dataset, device) -> torch.device:
    data_device = torch.device(dataset.device)
    if device is not None and torch.device(device) != data_device:
        raise ValueError(f"the dataset lives on {data_device} but training was asked to run on {device}; load it with device={device}")
    return data_device


def _global_rng_state(device: torch.device) -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_global_rng_state(state: Dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _autocast(device: torch.device, speed: SpeedOptions):
    dtype = speed.autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _check_finite(loss_sums: torch.Tensor, seeds: Sequence[int], epoch: int, recipe: Recipe) -> List[TrainingDiverged]:
    values = loss_sums.tolist()
    return [TrainingDiverged(seed, epoch, value, recipe) for seed, value in zip(seeds, values) if not math.isfinite(value)]


def _checkpoint_identity(spec: ModelSpec, dataset, recipe: Recipe, seed: int) -> Dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "seed": seed, "model": spec.to_dict(), "dataset": dataset.name, "recipe": recipe.to_dict()}


def _stored_identity(state: Dict[str, Any]) -> Dict[str, Any]:
    return state  # a regular checkpoint keeps its identity keys at the top level


def _checkpoint(identity, epoch, seconds, model_state, optimizer_state, generator, device) -> Dict[str, Any]:
    """Everything needed to continue a seed's training after ``epoch`` epochs."""
    return {
        **identity,
        "epoch": epoch,
        "seconds": seconds,
        "model_state": model_state,
        "optimizer_state": optimizer_state,
        "data_rng": generator.get_state(),
        "global_rng": _global_rng_state(device),
    }


def _epoch_bar(recipe: Recipe, start_epoch: int, description: str, enabled: bool):
    return progress_bar(total=recipe.epochs, initial=start_epoch, desc=description, unit="epoch", enabled=enabled, nested=True)


# -- one seed ----------------------------------------------------------------------------------


def train_model(
    spec: ModelSpec,
    dataset,
    recipe: Recipe,
    seed: int,
    *,
    device=None,
    checkpoint_path=None,
    progress: bool = True,
    speed: SpeedOptions = SpeedOptions(),
    on_epoch_end: Optional[Callable[[int], None]] = None,
) -> Tuple[Dict[str, torch.Tensor], TrainingMetrics]:
    """Train one model of ``spec`` on ``dataset`` with ``recipe`` and ``seed``.

    Returns ``(state_dict, metrics)``. With ``checkpoint_path`` the state is saved after every
    epoch and an existing checkpoint is resumed from. ``on_epoch_end(epoch)`` is called after
    each epoch's checkpoint is written (epochs count from 1). Raises :class:`TrainingDiverged`
    when the loss becomes non-finite.
    """
    device = _resolve_device(dataset, device)
    steps = steps_per_epoch(dataset, recipe.batch_size)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    model = init_model(spec, seed).to(device)
    channels_last = device.type == "cuda" and has_convolutions(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(recipe, model.parameters())
    generator = data_generator(seed)
    identity = _checkpoint_identity(spec, dataset, recipe, seed)
    forward = torch.compile(model) if speed.compile else model

    def prepare(inputs: torch.Tensor) -> torch.Tensor:
        return inputs.contiguous(memory_format=torch.channels_last) if channels_last and inputs.dim() == 4 else inputs

    with forked_global_rng(device, stream_seed(seed, RegularStream.DROPOUT)):
        start_epoch, seconds = 0, 0.0
        resumed = resume_checkpoint(checkpoint_path, identity, _stored_identity, "checkpoint")
        if resumed is not None:
            model.load_state_dict(resumed["model_state"])
            optimizer.load_state_dict(resumed["optimizer_state"])
            generator.set_state(resumed["data_rng"])
            _set_global_rng_state(resumed["global_rng"], device)
            start_epoch, seconds = resumed["epoch"], resumed["seconds"]
        with _epoch_bar(recipe, start_epoch, f"seed {seed}", progress) as bar:
            for epoch in range(start_epoch, recipe.epochs):
                started = time.perf_counter()
                model.train()
                loss_sum = torch.zeros((), device=device)
                for step, (inputs, labels) in enumerate(dataset.train_batches(recipe.batch_size, generator=generator)):
                    for group in optimizer.param_groups:
                        group["lr"] = recipe.lr_at(epoch + step / steps)
                    with _autocast(device, speed):
                        logits = forward(prepare(inputs))
                    loss = per_example_loss(logits, labels, dataset.binary, recipe.label_smoothing).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.detach()
                diverged = _check_finite(loss_sum.view(1), [seed], epoch + 1, recipe)
                if diverged:
                    raise diverged[0]
                seconds += time.perf_counter() - started
                if checkpoint_path is not None:
                    state = _checkpoint(identity, epoch + 1, seconds, model.state_dict(), optimizer.state_dict(), generator, device)
                    save_checkpoint(checkpoint_path, state)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}")
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1)

    started = time.perf_counter()
    model.eval()
    train_loss, train_accuracy = evaluate(lambda x: forward(prepare(x)), dataset, "train")
    test_loss, test_accuracy = evaluate(lambda x: forward(prepare(x)), dataset, "test")
    seconds += time.perf_counter() - started
    metrics = TrainingMetrics(
        train_loss.item(), train_accuracy.item(), test_loss.item(), test_accuracy.item(), seconds, recipe.epochs
    )
    return {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}, metrics


# -- K seeds at once ---------------------------------------------------------------------------


@dataclass
class TrainedModel:
    seed: int
    state_dict: Dict[str, torch.Tensor]
    metrics: TrainingMetrics


class _Bank:
    """K models of one architecture: each parameter and buffer stacked into a ``[K, ...]`` tensor.

    One leaf tensor per parameter name (rather than one ``[K, P]`` row bank) keeps the backward
    pass free of scatter-into-row copies; the optimizer sees the same parameter order as a single
    model's optimizer, so optimizer states convert by indexing ``[k]``.
    """

    def __init__(self, models: Sequence[nn.Module], device: torch.device):
        named = [dict(model.named_parameters()) for model in models]
        self.params = {
            name: torch.stack([params[name].detach() for params in named]).to(device).requires_grad_() for name in named[0]
        }
        self.buffers = {
            name: torch.stack([dict(model.named_buffers())[name] for model in models]).to(device)
            for name, _ in models[0].named_buffers()
        }
        self.skeleton = models[0].to(device)  # its own tensors are never used: functional_call swaps the banks in
        self.state_names = list(self.skeleton.state_dict().keys())
        stacked = getattr(self.skeleton, "stacked_forward", None)
        if stacked is not None and not self.buffers:
            # The architecture runs stacked parameters itself (one batched matmul per layer),
            # without vmap's per-step overhead (see starfast.models.mlp).
            self._forward = lambda params, buffers, inputs: stacked(params, inputs)
            self._forward_shared = lambda params, buffers, inputs: stacked(params, inputs, shared=True)
        else:
            self._forward = vmap(self._forward_one, in_dims=(0, 0, 0), randomness="different")
            self._forward_shared = vmap(self._forward_one, in_dims=(0, 0, None), randomness="different")

    def _forward_one(self, params, buffers, inputs):
        return functional_call(self.skeleton, (params, buffers), (inputs,))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-model inputs ``[K, B, ...]`` -> logits ``[K, B, C]``."""
        return self._forward(self.params, self.buffers, inputs)

    def forward_shared(self, inputs: torch.Tensor) -> torch.Tensor:
        """One input batch ``[B, ...]`` for all K models -> logits ``[K, B, C]``."""
        return self._forward_shared(self.params, self.buffers, inputs)

    def state_dict(self, k: int) -> Dict[str, torch.Tensor]:
        tensors = {**self.params, **self.buffers}
        return {name: tensors[name].detach()[k].clone() for name in self.state_names}

    @torch.no_grad()
    def load_state_dict_(self, k: int, state: Dict[str, torch.Tensor]) -> None:
        for name, bank in {**self.params, **self.buffers}.items():
            bank[k].copy_(state[name])

    def optimizer_state(self, optimizer: torch.optim.Optimizer, k: int) -> Dict[str, Any]:
        """Seed ``k``'s slice of the optimizer state, in the format of a single model's optimizer."""
        full = optimizer.state_dict()
        banks = list(self.params.values())
        state = {
            index: {key: value[k].clone() if _is_bank_state(value, banks[index]) else value for key, value in entry.items()}
            for index, entry in full["state"].items()
        }
        return {"state": state, "param_groups": full["param_groups"]}

    def load_optimizer_states_(self, optimizer: torch.optim.Optimizer, states: Sequence[Dict[str, Any]]) -> None:
        """Inverse of :meth:`optimizer_state`: stack K single-model states into ``optimizer``."""
        banks = list(self.params.values())
        merged = {}
        for index, entry in states[0]["state"].items():
            merged[index] = {
                key: torch.stack([state["state"][index][key] for state in states])
                if _is_bank_state(value, banks[index][0]) and key != "step"  # Adam's step count is shared
                else value
                for key, value in entry.items()
            }
        optimizer.load_state_dict({"state": merged, "param_groups": states[0]["param_groups"]})


def _is_bank_state(value: Any, parameter: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == parameter.shape


def train_models_parallel(
    spec: ModelSpec,
    dataset,
    recipe: Recipe,
    seeds: Sequence[int],
    *,
    device=None,
    checkpoint_paths: Optional[Sequence] = None,
    progress: bool = True,
    speed: SpeedOptions = SpeedOptions(),
    on_epoch_end: Optional[Callable[[int], None]] = None,
) -> Tuple[List[TrainedModel], List[TrainingDiverged]]:
    """Train one model per seed at once (see module docstring); equals :func:`train_model` per seed.

    Returns ``(trained, diverged)``: seeds whose loss became non-finite stop writing checkpoints
    and are reported in ``diverged`` instead of ``trained``. Existing checkpoints (from either
    path) are resumed; they must all be at the same epoch.
    """
    seeds = list(seeds)
    if not seeds:
        return [], []
    device = _resolve_device(dataset, device)
    steps = steps_per_epoch(dataset, recipe.batch_size)
    paths = [Path(path) for path in checkpoint_paths] if checkpoint_paths is not None else [None] * len(seeds)
    bank = _Bank([init_model(spec, seed) for seed in seeds], device)
    optimizer = make_optimizer(recipe, list(bank.params.values()))
    generators = [data_generator(seed) for seed in seeds]
    identities = [_checkpoint_identity(spec, dataset, recipe, seed) for seed in seeds]
    forward = torch.compile(bank.forward) if speed.compile else bank.forward

    with forked_global_rng(device, stream_seed(seeds[0], RegularStream.DROPOUT)):
        resumed = [resume_checkpoint(path, identity, _stored_identity, "checkpoint") for path, identity in zip(paths, identities)]
        epochs = {state["epoch"] if state else 0 for state in resumed}
        if len(epochs) > 1:
            raise ValueError(f"checkpoints of seeds {seeds} are at different epochs {sorted(epochs)}; train them in groups of equal epoch")
        start_epoch, seconds = epochs.pop(), 0.0
        if start_epoch > 0:
            for k, state in enumerate(resumed):
                bank.load_state_dict_(k, state["model_state"])
                generators[k].set_state(state["data_rng"])
            bank.load_optimizer_states_(optimizer, [state["optimizer_state"] for state in resumed])
            _set_global_rng_state(resumed[0]["global_rng"], device)
            seconds = sum(state["seconds"] for state in resumed)

        diverged: Dict[int, TrainingDiverged] = {}
        with _epoch_bar(recipe, start_epoch, f"seeds {seeds[0]}..{seeds[-1]}", progress) as bar:
            for epoch in range(start_epoch, recipe.epochs):
                started = time.perf_counter()
                bank.skeleton.train()
                loss_sums = torch.zeros(len(seeds), device=device)
                for step, (inputs, labels) in enumerate(dataset.stacked_train_batches(recipe.batch_size, generators)):
                    optimizer.param_groups[0]["lr"] = recipe.lr_at(epoch + step / steps)
                    with _autocast(device, speed):
                        logits = forward(inputs)
                    losses = per_example_loss(logits, labels, dataset.binary, recipe.label_smoothing).mean(-1)
                    optimizer.zero_grad(set_to_none=True)
                    losses.sum().backward()  # seed k's parameters only receive seed k's gradient
                    optimizer.step()
                    loss_sums += losses.detach()
                for failure in _check_finite(loss_sums, seeds, epoch + 1, recipe):
                    diverged.setdefault(failure.seed, failure)
                seconds += time.perf_counter() - started
                for k, (seed, path) in enumerate(zip(seeds, paths)):
                    if path is None or seed in diverged:
                        continue
                    state = _checkpoint(
                        identities[k], epoch + 1, seconds / len(seeds), bank.state_dict(k), bank.optimizer_state(optimizer, k),
                        generators[k], device,
                    )
                    save_checkpoint(path, state)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sums.mean().item() / steps:.4f}")
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1)
                if len(diverged) == len(seeds):
                    break

    started = time.perf_counter()
    bank.skeleton.eval()
    train_loss, train_accuracy = evaluate(bank.forward_shared, dataset, "train")
    test_loss, test_accuracy = evaluate(bank.forward_shared, dataset, "test")
    seconds += time.perf_counter() - started
    trained = [
        TrainedModel(
            seed,
            bank.state_dict(k),
            TrainingMetrics(
                train_loss[k].item(), train_accuracy[k].item(), test_loss[k].item(), test_accuracy[k].item(),
                seconds / len(seeds), recipe.epochs,
            ),
        )
        for k, seed in enumerate(seeds)
        if seed not in diverged
    ]
    return trained, [diverged[seed] for seed in seeds if seed in diverged]
