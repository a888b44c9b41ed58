"""The architecture zoo: build a model by name and get its permutation spec.

``build(name, num_classes=10, in_channels=3, input_shape=None, **options)`` constructs a randomly
initialised model; ``permutation_spec(model)`` returns its :class:`~starfast.spec.PermutationSpec`;
``names()`` lists the architectures; :class:`ModelSpec` is the JSON description from which any
stored model can be rebuilt without loading its dataset. Each family lives in its own module and owns its spec:

- ``mlp`` (:mod:`.mlp`): depth=2 hidden layers, width=128, activation relu|elu|silu|identity, bias=True.
- ``linear2`` (:mod:`.mlp`): the paper's bias-free two-layer net; width=128, activation identity|elu.
- ``resnet18``, ``resnet20`` (:mod:`.resnet`): CIFAR ResNets; width=1 multiplies 64 / 16 channels,
  activation=relu (or elu, silu).
- ``resnet18-imagenet`` (:mod:`.resnet`): torchvision's resnet18 (needs torchvision).
- ``wrn`` (:mod:`.wrn`): WideResNet, depth=22 (16..40, (depth - 4) % 6 == 0), width=1 (1..8),
  activation=relu.
- ``vgg11``, ``vgg19`` (:mod:`.vgg`): width=1 multiplies the channels, activation=relu,
  batchnorm=True (False: the official code's plain VGG).

Activations are one table for every family (:data:`~starfast.models.options.ACTIVATIONS`).
- ``densenet40`` (:mod:`.densenet`): DenseNet-40, growth=12.
- ``vit`` (:mod:`.vit`): patch=4, dim=128, depth=6, heads=4, mlp_dim=256.

Any other architecture comes from a factory the user writes (:mod:`.factory`): ``arch`` is then
``package.module:factory`` or ``path/to/file.py:factory``.

Family names are accepted wherever a name is (:data:`ALIASES`): ``resnet`` is ``resnet18``,
``densenet`` ``densenet40``, ``vgg`` ``vgg19``, ``wideresnet`` ``wrn``; :func:`canonical_name`
resolves them (case-insensitively) and suggests the closest name for a typo.

``mlp``, ``linear2`` and ``vit`` need ``input_shape``; the conv nets take any image of at least
8x8 pixels. ``input_shape`` is the shape of one example, e.g. ``(1, 8, 8)`` or ``(2,)``. Image models take
their channel count from ``in_channels`` and, when ``input_shape`` is given too, require the two
to agree; the fully connected models ignore ``in_channels``.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from starfast.models.densenet import build_densenet40
from starfast.models.factory import (
    build_user_model, carried_spec, describe_change, is_factory_reference, normalised_reference, recorded_spec, run_name, source_record,
)
from starfast.models.mlp import build_linear2, build_mlp
from starfast.models.options import positive_int
from starfast.models.resnet import build_resnet18, build_resnet18_imagenet, build_resnet20
from starfast.models.vgg import build_vgg11, build_vgg19
from starfast.models.vit import build_vit
from starfast.models.wrn import build_wrn
from starfast.files import StoredFileError
from starfast.names import resolve_name
from starfast.spec import PermutationSpec

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": build_mlp,
    "linear2": build_linear2,
    "resnet18": build_resnet18,
    "resnet20": build_resnet20,
    "resnet18-imagenet": build_resnet18_imagenet,
    "wrn": build_wrn,
    "vgg11": build_vgg11,
    "vgg19": build_vgg19,
    "densenet40": build_densenet40,
    "vit": build_vit,
}


# The family names of the paper and the official code, each mapped to the member it means.
ALIASES: Dict[str, str] = {
    "resnet": "resnet18",
    "densenet": "densenet40",
    "vgg": "vgg19",
    "wideresnet": "wrn",
    "wide-resnet": "wrn",
}


def names() -> List[str]:
    return list(_BUILDERS)


def canonical_name(name: str) -> str:
    """The architecture ``name`` means (an alias resolved); ``ValueError`` with a suggestion otherwise."""
    return resolve_name("architecture", name, names(), ALIASES)


def canonical_arch(arch: str) -> str:
    """What ``--arch`` means: a zoo name (:func:`canonical_name`) or a factory reference (a file
    made absolute, :func:`.factory.normalised_reference`)."""
    return normalised_reference(arch) if is_factory_reference(arch) else canonical_name(arch)


def run_label(arch: str) -> str:
    """``arch`` as a folder name (a factory reference becomes ``file-factory``)."""
    return run_name(arch) if is_factory_reference(arch) else arch


def options(name: str) -> Dict[str, object]:
    """The keyword options of architecture ``name`` with their defaults."""
    builder = _builder(name)
    return {
        parameter.name: parameter.default
        for parameter in inspect.signature(builder).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    input_shape: Optional[Sequence[int]] = None,
    **kw,
) -> nn.Module:
    """A randomly initialised model of architecture ``name`` (see the module docstring)."""
    name = canonical_name(name)
    builder = _builder(name)
    accepted = options(name)
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        described = ", ".join(f"{option}={default!r}" for option, default in accepted.items()) or "none"
        raise ValueError(f"{name} does not take option(s) {unknown}; its options are: {described}")
    positive_int("num_classes", num_classes)
    if input_shape is not None:
        input_shape = tuple(input_shape)
        if not input_shape or not all(isinstance(size, int) and size >= 1 for size in input_shape):
            raise ValueError(f"input_shape={input_shape!r} must be the shape of one example: positive ints, e.g. (3, 32, 32)")
    return builder(num_classes, in_channels, input_shape, **kw)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a stored model (JSON-ready): a zoo architecture's name, or a
    user factory's reference (:mod:`.factory`) with ``source``, the record of its file and spec that
    every later build must match."""

    arch: str
    num_classes: int
    in_channels: int
    input_shape: Tuple[int, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    source: Optional[Dict[str, Any]] = None

    @classmethod
    def for_dataset(cls, arch: str, dataset: Any, kwargs: Optional[Mapping[str, Any]] = None) -> "ModelSpec":
        """The spec of ``arch`` on ``dataset``: binary tasks get one output logit (BCE). A user
        factory is built once here, to record its source and spec."""
        spec = cls(
            arch=arch,
            num_classes=1 if dataset.binary else int(dataset.num_classes),
            in_channels=int(dataset.in_channels),
            input_shape=tuple(int(size) for size in dataset.input_shape),
            kwargs=dict(kwargs or {}),
        )
        if not is_factory_reference(arch):
            return spec
        return replace(spec, source=source_record(arch, spec._build_user_model()))

    def build(self) -> nn.Module:
        """A freshly initialised module (uses the global RNG: see ``starfast.training.init_model``);
        a user factory whose file or spec no longer matches ``source`` raises ``ValueError`` naming
        the change."""
        if not is_factory_reference(self.arch):
            return build(
                self.arch, num_classes=self.num_classes, in_channels=self.in_channels, input_shape=self.input_shape, **self.kwargs
            )
        model = self._build_user_model()
        if self.source is not None:
            record = source_record(self.arch, model)
            if record != self.source:
                raise StoredFileError(f"{describe_change(self.arch, self.source, record)} since the models were made; restore it, "
                                 "or use another --run-dir")
        return model

    def _build_user_model(self) -> nn.Module:
        return build_user_model(self.arch, self.num_classes, self.in_channels, self.input_shape, self.kwargs)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        if self.source is None:
            del data["source"]  # zoo models: the records written before user architectures existed
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        return cls(**{**data, "input_shape": tuple(data["input_shape"])})


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The permutation spec of a model built by :func:`build`, by :class:`ModelSpec` from a user
    factory (the spec recorded then), any model with a ``permutation_spec()`` method, or any
    torchvision ResNet."""
    spec = recorded_spec(model)
    if spec is None:
        spec = carried_spec(model)
    if spec is None:
        raise TypeError(
            f"no permutation spec is known for {type(model).__name__}; build models with starfast.models.build "
            f"({', '.join(names())}) or give the model a permutation_spec() method"
        )
    return spec


def _builder(name: str) -> Callable[..., nn.Module]:
    return _BUILDERS[canonical_name(name)]
