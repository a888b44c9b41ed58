"""Training recipes: which optimizer, learning rate, schedule, epochs and batch size train a model.

This module owns the :class:`Recipe` dataclass and the table of recipes per (architecture,
dataset). Paper recipes follow Appendix B of Sonthalia et al. (ICLR 2025):

==================  ===========================================================================
CIFAR ResNet-18     SGD momentum 0.9, wd 5e-4, lr 0.1 cosine to 0, 200 epochs, batch 128
(also resnet20,     (the paper trains ResNet-18; the other CIFAR ResNets use the same recipe)
wrn, mlp, linear2)
CIFAR DenseNet-40   as ResNet-18 but batch 64, wd 1e-4, 300 epochs, lr 0.1 ×0.1 at 150 and 225
CIFAR VGG           as ResNet-18 but lr 0.05 ×0.1 at epochs 100 and 150
ImageNet (any)      SGD momentum 0.9, wd 1e-4, lr 0.1 ×0.1 at 30/60/90, 100 epochs, batch 256
ViT (any data)      AdamW lr 1e-3, wd 5e-3, 100 epochs (Appendix A.3.2), constant lr
==================  ===========================================================================

The bundled small datasets (digits, gaussians, mnist1d, synthetic) get short presets that train a
model in seconds on a CPU (an MLP on digits reaches >= 95% test accuracy). The main job's other
per-dataset defaults live here too: the model options when no ``--arch-kw`` is given
(:func:`main_job_arch_kw`) and the star's epochs when no ``--star-epochs`` is given
(:func:`default_star_epochs`).

:func:`resolve` picks the base recipe and applies overrides (the CLI flags). :func:`resolve_own`
gives a set of models its own overrides on top of the shared ones (the star's ``--star-optimizer``
…, an ``--extra-heldout`` set's recipe; Appendix D.2). Two overrides carry the rest of the recipe
along so that a flag does what it says:

- ``epochs`` without ``milestones`` rescales step milestones proportionally (VGG's 100/150 of 200
  become 50/75 of 100), so a shortened run keeps the shape of its schedule;
- ``optimizer`` switched from SGD to Adam/AdamW without ``lr`` uses lr 1e-3 (an SGD learning rate
  of 0.1 makes Adam diverge); likewise an own optimizer that differs from the shared one does not
  inherit the shared ``lr`` (the other optimizer's learning rate means nothing to it).

The learning rate is a pure function of training progress (:meth:`Recipe.lr_at`), evaluated every
step; a checkpoint's epoch counter is therefore the whole scheduler state.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
ADAPTIVE_DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one regular training run (JSON-ready via :meth:`to_dict`)."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: Tuple[int, ...] = ()
    gamma: float = 0.1
    epochs: int = 200
    batch_size: int = 128
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the CLI flag of the first invalid value."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"--gamma must be in (0, 1], got {self.gamma}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ValueError(f"--milestones must be increasing positive epochs, got {list(self.milestones)}")

    def lr_at(self, epoch_progress: float) -> float:
        """Learning rate after ``epoch_progress`` epochs (fractional: 2.5 = half-way through the 3rd)."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch_progress / self.epochs, 1.0)))
        if self.schedule == "step":
            passed = sum(1 for milestone in self.milestones if epoch_progress >= milestone)
            return self.lr * self.gamma**passed
        return self.lr

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["milestones"] = list(self.milestones)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        unknown = set(data) - {field.name for field in fields(cls)}
        if unknown:
            raise ValueError(f"recipe has unknown fields {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)


# -- the table -----------------------------------------------------------------------------------

_CIFAR_RESNET = Recipe()  # Appendix B.1, ResNet18 on CIFAR
_CIFAR_DENSENET = replace(_CIFAR_RESNET, batch_size=64, weight_decay=1e-4, epochs=300, schedule="step", milestones=(150, 225))
_CIFAR_VGG = replace(_CIFAR_RESNET, lr=0.05, schedule="step", milestones=(100, 150))
_IMAGENET = Recipe(lr=0.1, weight_decay=1e-4, schedule="step", milestones=(30, 60, 90), epochs=100, batch_size=256)
_VIT = Recipe(optimizer="adamw", lr=1e-3, weight_decay=5e-3, schedule="constant", epochs=100, batch_size=128)

CIFAR_RECIPES: Dict[str, Recipe] = {
    "densenet40": _CIFAR_DENSENET,
    "vgg11": _CIFAR_VGG,
    "vgg19": _CIFAR_VGG,
}

# Short presets for the bundled datasets: seconds per model on a CPU, same optimizer family as the
# paper (SGD + momentum + cosine) so that regular solutions are SGD solutions.
BUNDLED_PRESETS: Dict[str, Recipe] = {
    "digits": Recipe(lr=0.05, weight_decay=5e-4, epochs=30, batch_size=32),
    "mnist1d": Recipe(lr=0.05, weight_decay=5e-4, epochs=40, batch_size=64),
    "gaussians": Recipe(lr=0.05, weight_decay=0.0, epochs=20, batch_size=32),
    "synthetic": Recipe(lr=0.05, weight_decay=5e-4, epochs=10, batch_size=64),
}


# The main job's defaults on bundled data beyond the recipe, chosen by measurement
# (docs/evidence/default-sweep.md) so that `python -m starfast.train` with no flags shows the
# paper's claim on digits well within three minutes on 2 CPU cores: the model options used when no
# --arch-kw is given, and how many times the regular models' epochs the star trains when no
# --star-epochs is given (on digits the star needs longer than a regular model to reach its loss).
MAIN_JOB_ARCH_KW: Dict[Tuple[str, str], Dict[str, Any]] = {
    ("mlp", "digits"): {"width": 24, "depth": 3},
}
STAR_EPOCHS_FACTOR: Dict[str, int] = {"digits": 3}


def main_job_arch_kw(arch: str, dataset: str) -> Dict[str, Any]:
    """Model options of ``arch`` on ``dataset`` when the command line gives none (empty for the
    pairs without measured defaults: the architecture's own defaults apply)."""
    return dict(MAIN_JOB_ARCH_KW.get((arch, dataset), {}))


def default_star_epochs(dataset: str, regular_epochs: int) -> int:
    """Epochs of star training when ``--star-epochs`` is not given: the regular models' epochs
    (the paper's recipe), times :data:`STAR_EPOCHS_FACTOR` on the datasets that need longer."""
    return STAR_EPOCHS_FACTOR.get(dataset, 1) * regular_epochs


def base_recipe(arch: str, dataset: str) -> Recipe:
    """The recipe before overrides: preset for bundled data, Appendix B for CIFAR/ImageNet."""
    if dataset in BUNDLED_PRESETS:
        preset = BUNDLED_PRESETS[dataset]
        if arch == "vit":  # transformers want Adam(W); keep the preset's length and batch size
            return replace(_VIT, epochs=preset.epochs, batch_size=preset.batch_size)
        return preset
    if arch == "vit":
        return _VIT
    if dataset == "imagenet":
        return _IMAGENET
    return CIFAR_RECIPES.get(arch, _CIFAR_RESNET)


def resolve(arch: str, dataset: str, overrides: Optional[Mapping[str, Any]] = None) -> Recipe:
    """The recipe for ``arch`` on ``dataset`` with ``overrides`` (``None`` values are ignored).

    See the module docstring for how ``epochs`` and ``optimizer`` overrides adjust the rest.
    """
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    known = {field.name for field in fields(Recipe)}
    unknown = set(given) - known
    if unknown:
        raise ValueError(f"unknown recipe override(s) {sorted(unknown)}; known: {sorted(known)}")
    base = base_recipe(arch, dataset)
    derived: Dict[str, Any] = {}
    if "epochs" in given and "milestones" not in given and base.milestones:
        scale = int(given["epochs"]) / base.epochs
        derived["milestones"] = sorted({max(1, round(m * scale)) for m in base.milestones})
    if given.get("optimizer", base.optimizer) != "sgd" and base.optimizer == "sgd" and "lr" not in given:
        derived["lr"] = ADAPTIVE_DEFAULT_LR
    if "milestones" in given and "schedule" not in given:
        derived["schedule"] = "step"
    return replace(base, **{**derived, **given})


def resolve_own(arch: str, dataset: str, shared: Optional[Mapping[str, Any]], own: Optional[Mapping[str, Any]]) -> Recipe:
    """The recipe of a set of models with its ``own`` overrides on top of the ``shared`` ones
    (``None`` values ignored in both). When ``own`` changes the optimizer without giving ``lr``, the
    shared ``lr`` is dropped, so the learning rate is that optimizer's default (see :func:`resolve`)."""
    shared = {key: value for key, value in (shared or {}).items() if value is not None}
    own = {key: value for key, value in (own or {}).items() if value is not None}
    if "optimizer" in own and "lr" not in own and own["optimizer"] != resolve(arch, dataset, shared).optimizer:
        shared.pop("lr", None)
    return resolve(arch, dataset, {**shared, **own})
