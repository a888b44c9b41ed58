"""Smoke runs (``--smoke`` of ``python -m starfast.train`` and ``python -m starfast.experiments``):
the real code path of a setting on a small subset with capped steps.

A smoke run keeps everything that decides *whether* a run works — the dataset's format and input
shape, the architecture and its options, the recipe (optimizer, schedule, batch size, precision),
Starlight, BatchNorm recomputation, the evaluation, tables and figures — and shrinks only how much
of it there is: :data:`TRAIN_EXAMPLES` train and :data:`TEST_EXAMPLES` test examples, one epoch for
the models and the stars, a few models (:data:`SIZES`). Its numbers mean nothing, and it says so
(:data:`BANNER`); it is judged by completing, so the "learned nothing" rule
(:class:`starfast.pipeline.LearningCheck`) is not applied to its models. Its default run
directories end in ``-smoke``, apart from those of real runs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict

from starfast.recipes import Recipe

TRAIN_EXAMPLES = 64
TEST_EXAMPLES = 32
EPOCHS = 1
SIZES: Dict[str, int] = {"sources": 2, "heldout": 2, "star_seeds": 1}
BANNER = (f"SMOKE RUN: {TRAIN_EXAMPLES} train / {TEST_EXAMPLES} test examples, {EPOCHS} epoch per model and star, "
          f"{SIZES['sources']} sources, {SIZES['heldout']} held-out models, {SIZES['star_seeds']} star. Its numbers MEAN "
          "NOTHING: it only shows that this setting's code path runs to the end.")


def dataset(full: Any) -> Any:
    """The smoke subset of a loaded dataset (the first examples of each split)."""
    subset = getattr(full, "subset", None)
    if subset is None:
        raise ValueError(f"--smoke needs a dataset held in memory; {full.name} is read from image folders")
    return subset(min(TRAIN_EXAMPLES, full.num_train), min(TEST_EXAMPLES, full.num_test))


def recipe(full: Recipe) -> Recipe:
    """``full`` with :data:`EPOCHS` epochs and a batch no larger than the smoke subset (so that an
    epoch has at least one step); its milestones scaled as ``--epochs`` scales them."""
    scaled = sorted({max(1, round(m * EPOCHS / full.epochs)) for m in full.milestones})
    return replace(full, epochs=EPOCHS, batch_size=min(full.batch_size, TRAIN_EXAMPLES), milestones=tuple(scaled))
