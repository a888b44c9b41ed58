"""User architectures: a factory named by ``package.module:factory`` or ``path/to/file.py:factory``.

This module owns

- :func:`is_factory_reference` and :func:`normalised_reference` (a file path made absolute, so a
  run directory rebuilds the model from any working directory);
- :func:`build_user_model`: the factory called with the ``--arch-kw`` values and whichever of
  ``num_classes``, ``in_channels`` and ``input_shape`` its signature names; its module (or file)
  is imported once per content;
- :func:`spec_for_user_model`: the permutation spec of a model the zoo did not build;
  :func:`carried_spec`, the spec a model carries itself (a ``permutation_spec()`` method);
  :func:`record_spec` and :func:`recorded_spec`, the spec recorded for a model (by
  :func:`build_user_model`, or by the in-memory API); the recorded and the carried spec are what
  :func:`starfast.models.permutation_spec` answers;
- :func:`source_record`: what a run directory records of a user architecture (the factory's
  source file, its SHA-256, the spec's fingerprint and group sizes), and :func:`describe_change`,
  the sentence naming what changed between two records.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from starfast.files import file_digest
from starfast.models.resnet import resnet_spec
from starfast.spec import PermutationSpec

SHAPE_ARGUMENTS = ("num_classes", "in_channels", "input_shape")
EXAMPLE_BATCH = 2  # examples in the input a spec is derived (and checked) with
EXAMPLE_SEED = 0

_specs_of_built: "weakref.WeakKeyDictionary[nn.Module, PermutationSpec]" = weakref.WeakKeyDictionary()
_specs: Dict[str, PermutationSpec] = {}  # per architecture (reference, file content, shapes, options)
_modules: Dict[Tuple[str, str], Any] = {}  # (file, SHA-256) -> the module imported from it


def is_factory_reference(arch: str) -> bool:
    """Whether ``arch`` names a factory (``module:factory`` or ``file.py:factory``), not a zoo name."""
    return ":" in arch


def normalised_reference(text: str) -> str:
    """``text`` checked for the ``target:factory`` form, a file target made absolute; ``ValueError``
    naming the forms otherwise."""
    target, _, name = text.rpartition(":")
    if not target or not name.isidentifier():
        raise ValueError(f"--arch {text!r} is neither an architecture name nor a factory: use package.module:factory or "
                         "path/to/file.py:factory")
    if _is_file(target):
        return f"{Path(target).expanduser().resolve()}:{name}"
    return f"{target}:{name}"


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target


def run_name(reference: str) -> str:
    """A folder name for a run of the factory ``reference`` (``file-factory``)."""
    target, _, name = reference.rpartition(":")
    return f"{Path(target).stem if _is_file(target) else target}-{name}"


def load_factory(reference: str) -> Tuple[Callable[..., nn.Module], Optional[Path]]:
    """The factory ``reference`` names and its source file (``None`` for a module without one)."""
    target, _, name = reference.rpartition(":")
    if _is_file(target):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"--arch {reference}: {path} is not a file")
        key = (str(path), file_digest(path))
        if key not in _modules:
            module_name = f"starfast_user_{path.stem}_{key[1][:12]}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
            try:
                spec.loader.exec_module(module)
            except Exception as error:
                del sys.modules[module_name]
                raise ValueError(f"--arch {reference}: importing {path} failed ({type(error).__name__}: {error})") from error
            _modules[key] = module
        module = _modules[key]
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise ValueError(f"--arch {reference}: cannot import module {target!r} ({error}); is it on PYTHONPATH?") from None
        path = Path(module.__file__) if getattr(module, "__file__", None) else None
    factory = getattr(module, name, None)
    if not callable(factory):
        defined = sorted(key for key, value in vars(module).items()
                         if callable(value) and not key.startswith("_") and getattr(value, "__module__", None) == module.__name__)
        raise ValueError(f"--arch {reference}: {path or target} defines no function {name!r}; it defines "
                         f"{', '.join(defined) or 'nothing callable'}")
    return factory, path


def build_user_model(reference: str, num_classes: int, in_channels: int, input_shape: Sequence[int],
                     kwargs: Mapping[str, Any]) -> nn.Module:
    """The model the factory ``reference`` returns for these shapes and options (see the module
    docstring), its spec recorded for :func:`recorded_spec`."""
    factory, path = load_factory(reference)
    parameters = inspect.signature(factory).parameters
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    unknown = sorted(set(kwargs) - set(parameters)) if not takes_any else []
    if unknown:
        accepted = [name for name in parameters if name not in SHAPE_ARGUMENTS]
        raise ValueError(f"--arch {reference} does not take option(s) {unknown}; it takes: {', '.join(accepted) or 'none'}")
    shapes = {"num_classes": num_classes, "in_channels": in_channels, "input_shape": tuple(input_shape)}
    model = factory(**{name: value for name, value in shapes.items() if name in parameters}, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--arch {reference} returned a {type(model).__name__}, not a torch.nn.Module")
    key = json.dumps([reference, file_digest(path) if path else None, num_classes, in_channels, list(input_shape),
                      dict(kwargs)], sort_keys=True, default=str)
    if key not in _specs:
        _specs[key] = spec_for_user_model(model, example_input(input_shape))
    record_spec(model, _specs[key])
    return model


def example_input(input_shape: Sequence[int]) -> torch.Tensor:
    """A fixed random batch of ``input_shape`` examples to derive and check a spec with."""
    return torch.randn((EXAMPLE_BATCH, *input_shape), generator=torch.Generator().manual_seed(EXAMPLE_SEED))


def spec_for_user_model(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """The permutation spec of ``model``, a network the zoo did not build: the one it carries
    (:func:`carried_spec`), validated against its tensors.

    ``example_input`` is what derives and checks the spec once the graph tracer is merged: the
    ``raise`` below becomes ``spec = trace_spec(model, example_input)`` and the line after the
    validation ``check_spec(model, spec, example_input)``."""
    spec = carried_spec(model)
    if spec is None:
        raise ValueError(f"no permutation spec is known for {type(model).__name__} and models cannot be traced yet: give "
                         "it a permutation_spec() method returning a starfast.PermutationSpec")
    spec.validate(model)
    return spec


def carried_spec(model: nn.Module) -> Optional[PermutationSpec]:
    """The spec a model carries: its ``permutation_spec()`` method (every zoo model has one), or
    the spec of a torchvision ResNet; ``None`` for any other model."""
    method = getattr(model, "permutation_spec", None)
    if callable(method):
        return method()
    if type(model).__module__.startswith("torchvision.models.resnet"):
        return resnet_spec(model)
    return None


def record_spec(model: nn.Module, spec: PermutationSpec) -> None:
    """Make ``spec`` the one :func:`starfast.models.permutation_spec` answers for ``model`` (kept as
    long as the model lives)."""
    _specs_of_built[model] = spec


def recorded_spec(model: nn.Module) -> Optional[PermutationSpec]:
    """The spec recorded for ``model`` (by :func:`build_user_model` or :func:`record_spec`), or ``None``."""
    return _specs_of_built.get(model)


def spec_fingerprint(spec: PermutationSpec) -> str:
    """SHA-256 of the spec's groups: names, sizes and the (tensor, axis, offset) of every axis."""
    groups = [[group.name, group.size, sorted([axis.name, axis.axis, axis.offset] for axis in group.axes)]
              for group in spec.groups]
    return hashlib.sha256(json.dumps(sorted(groups)).encode()).hexdigest()


def source_record(reference: str, model: nn.Module) -> Dict[str, Any]:
    """What a run directory records of the user architecture ``model`` was built from:
    ``{"file", "sha256", "spec", "groups"}`` (the spec's fingerprint and each group's size)."""
    _, path = load_factory(reference)
    spec = recorded_spec(model)
    return {"file": str(path) if path else None, "sha256": file_digest(path) if path else None,
            "spec": spec_fingerprint(spec), "groups": {group.name: group.size for group in spec.groups}}


def describe_change(reference: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """One sentence naming what changed between two :func:`source_record` s of ``reference``."""
    changes = []
    if old.get("sha256") != new.get("sha256"):
        changes.append(f"its file {new.get('file')} changed (sha256 {str(old.get('sha256'))[:12]}... -> "
                       f"{str(new.get('sha256'))[:12]}...)")
    before, after = old.get("groups", {}), new.get("groups", {})
    groups = [f"{name} {before[name]} -> {after[name]}" for name in before if name in after and before[name] != after[name]]
    groups += [f"{name} added" for name in after if name not in before]
    groups += [f"{name} removed" for name in before if name not in after]
    if groups or old.get("spec") != new.get("spec"):
        changes.append("its permutation spec changed" + (f" ({'; '.join(groups)})" if groups else " (same group sizes, "
                                                         "other axes)"))
    return f"--arch {reference}: " + " and ".join(changes or ["its record changed"])
