"""The Python API for models held in memory: a star of a list of ``nn.Module`` s, and the barrier
between two of them, without a run directory.

- :func:`find_star` trains a star model with Starlight (:func:`starfast.starlight.train_star`, the
  same function the main job's star stage calls) against the given models and returns it as a
  module of their class;
- :func:`barrier` aligns one model with another (:func:`starfast.evaluation.align`, weight matching
  by default) and measures the barrier curve between them (:func:`starfast.evaluation.pair_curve`,
  with BatchNorm statistics recomputed along the path), as the evaluation of a run does.

The models' permutation spec is :func:`starfast.models.factory.spec_for_user_model`'s (a zoo
model's, or the one a model carries). Data is a :class:`starfast.data.Dataset` (e.g.
``starfast.data.load("digits")``) or ``(inputs, labels)`` tensors, with optional
``(inputs, labels)`` test tensors.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from starfast.barrier import BarrierCurve
from starfast.data.dataset import Dataset, TensorDataset
from starfast.evaluation import EvaluationConfig, LoadedModel, align, pair_curve
from starfast.flat import ParamSpace
from starfast.models.factory import spec_for_user_model
from starfast.pipeline import STAR_SEED_START
from starfast.recipes import Recipe, default_star_epochs, resolve
from starfast.spec import PermutationSpec
from starfast.starlight import StarlightOptions, train_star
from starfast.training_common import forked_global_rng

Tensors = Tuple[torch.Tensor, torch.Tensor]
Data = Union[Dataset, Tensors]
IN_MEMORY = "tensors"  # the name of a dataset made from tensors (its recipe: the paper's CIFAR one)
ANY_ARCHITECTURE = ""  # recipes by architecture are the zoo's; a model in memory gets the dataset's


def as_dataset(data: Data, test_data: Optional[Tensors], model: nn.Module) -> Dataset:
    """``data`` as a :class:`~starfast.data.Dataset`: itself, or ``(inputs, labels)`` tensors with
    ``test_data`` as the test split (the train split when ``None``); the number of classes is the
    model's number of outputs (one output: a binary task)."""
    if isinstance(data, Dataset):
        if test_data is not None:
            raise ValueError("test_data is for (inputs, labels) tensors; a Dataset brings its own test split")
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(item, torch.Tensor) for item in data)):
        raise ValueError(f"data must be a starfast.data.Dataset or (inputs, labels) tensors, got {type(data).__name__}")
    inputs, labels = data
    test_inputs, test_labels = test_data if test_data is not None else data
    was_training = model.training
    with torch.no_grad():
        outputs = model.eval()(inputs[:2].to(next(model.parameters()).device)).shape[-1]
    model.train(was_training)
    return TensorDataset(IN_MEMORY, inputs, labels, test_inputs, test_labels, max(outputs, 2), inputs.device,
                         binary=outputs == 1)


def _spec_of(model: nn.Module, dataset: Dataset) -> PermutationSpec:
    example, _ = next(iter(dataset.eval_batches("train", 2)))
    return spec_for_user_model(model, example.to(next(model.parameters()).device))


def _fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` re-initialised by each submodule's ``reset_parameters()`` under ``seed``
    (parameters no submodule resets keep ``model``'s values)."""
    fresh = copy.deepcopy(model)
    with forked_global_rng(torch.device("cpu"), seed):
        for module in fresh.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    return fresh


def find_star(
    models: Sequence[nn.Module],
    train_data: Data,
    *,
    test_data: Optional[Tensors] = None,
    epochs: Optional[int] = None,
    recipe: Optional[Recipe] = None,
    options: StarlightOptions = StarlightOptions(),
    init: Optional[nn.Module] = None,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """A star model of ``models`` (trained solutions of one architecture): Starlight against all
    of them, on ``train_data``, returned as a module of their class in eval mode.

    ``recipe``: the star's optimizer and schedule (default: the dataset's recipe as the main job
    resolves it for an architecture without a recipe of its own, e.g. the short preset on digits
    and the paper's CIFAR recipe on tensors; with ``epochs`` when given, else the main job's star
    epochs). ``options``:
    Starlight's (matcher, t sampling, ...). ``init``: θ₀ (default: a copy of the first model
    re-initialised with ``reset_parameters()`` under ``seed``). ``seed`` also drives Starlight's
    random streams, as star seed ``seed`` of a run does."""
    models = list(models)
    if not models:
        raise ValueError("find_star needs at least one model")
    dataset = as_dataset(train_data, test_data, models[0])
    skeleton = copy.deepcopy(models[0])
    space = ParamSpace(skeleton)
    for index, model in enumerate(models):
        space.check_compatible(model, f"models[{index}]")
    spec = _spec_of(skeleton, dataset)
    if recipe is None:
        base = resolve(ANY_ARCHITECTURE, dataset.name)
        recipe = resolve(ANY_ARCHITECTURE, dataset.name, {"epochs": epochs or default_star_epochs(dataset.name, base.epochs)})
    elif epochs is not None:
        raise ValueError("give the star's epochs in recipe= or epochs=, not both")
    start = init if init is not None else _fresh_copy(models[0], STAR_SEED_START + seed)
    result = train_star(skeleton, space.stack(models), spec, dataset, recipe, options, space=space,
                        init_row=space.flatten(start), seed=STAR_SEED_START + seed, device=dataset.device,
                        quiet=not progress)
    star = copy.deepcopy(models[0])
    star.load_state_dict(result.state_dict)
    return star.eval()


def barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Data,
    *,
    match: bool = True,
    test_data: Optional[Tensors] = None,
    ts: int = 11,
    matcher: str = "wm",
    bn_batches: Optional[int] = None,
) -> BarrierCurve:
    """The loss and accuracy along the segment from ``model_a`` to ``model_b`` (aligned with
    ``model_a`` by ``matcher`` first when ``match``), on ``ts`` points, with the barriers
    (``curve.loss_barrier["train"]``, and ``["test"]`` when there is a test split)."""
    dataset = as_dataset(data, test_data, model_a)
    config = EvaluationConfig(matcher=matcher if match else "none", ts=ts, bn_batches=bn_batches)
    skeleton = copy.deepcopy(model_a)
    space = ParamSpace(skeleton)
    space.check_compatible(model_b, "model_b")
    spec = _spec_of(skeleton, dataset) if match else None
    anchor, partner = (LoadedModel.from_state(label, model.state_dict(), space, digest="")  # never stored
                       for label, model in (("model_a", model_a), ("model_b", model_b)))
    for model in (anchor, partner):
        if not bool(torch.isfinite(model.row).all()):
            raise ValueError(f"{model.label} holds NaN or infinite weights")
    [[aligned, *_]] = align(anchor, [partner], spec, space, config)
    train = lambda: dataset.eval_batches("train", config.batch_size)  # noqa: E731
    test = lambda: dataset.eval_batches("test", config.batch_size)  # noqa: E731
    has_test = isinstance(data, Dataset) or test_data is not None  # tensors without a test split: no test curve
    return pair_curve(skeleton, space, anchor, aligned.row, aligned.buffers, train, test if has_test else None, config, spec)
