"""Checkpoints trained elsewhere: finding them, reading them the ways people save them, and fitting
them to a model.

- :func:`find_checkpoints` turns ``--sources-from``/``--heldout-from`` (a glob, or a folder) into
  the checkpoints it names, in natural order (``seed-2`` before ``seed-10``): files ending in
  ``.safetensors``, ``.pt``, ``.pth`` or ``.bin``, and Hugging Face-style folders holding
  ``model.safetensors`` (or ``pytorch_model.bin``);
- :func:`read_checkpoint` reads one: safetensors, or a PyTorch pickle loaded with
  ``weights_only=True`` (no code in a checkpoint runs), the state dict taken from under a
  ``state_dict``/``model_state_dict``/``model`` key when it is wrapped, and the ``module.``
  (DataParallel/DDP) and ``_orig_mod.`` (``torch.compile``) prefixes stripped from its names;
- :func:`fit_state_dict` checks it against a model: missing, unexpected and mis-shaped names are
  one error listing them all, and non-finite values are refused.

Every failure is a :class:`CheckpointImportError` (a :class:`~starfast.files.StoredFileError`, so
the command lines print it as one line) naming the file and what to do. Importing a checkpoint
into a run directory is the pipeline's (:func:`starfast.pipeline.import_missing_models`).
"""
from __future__ import annotations

import glob
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import torch

from starfast.files import StoredFileError, bytes_digest

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a Hugging Face-style folder's weights file
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
LISTED = 6  # names shown per kind of mismatch; the rest are counted


class CheckpointImportError(StoredFileError):
    """A checkpoint to import cannot be found, read, or does not fit the model."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from ``path`` (the file whose bytes were read), with the SHA-256 of those bytes."""

    path: Path
    sha256: str
    state_dict: Dict[str, torch.Tensor]


def _natural_key(path: Path) -> List[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def weights_file(path: Path) -> Path:
    """The file holding a checkpoint's weights: ``path`` itself, or a folder's ``model.safetensors``."""
    if path.is_dir():
        for name in FOLDER_WEIGHTS:
            if (path / name).is_file():
                return path / name
        raise CheckpointImportError(f"{path} is a folder without {' or '.join(FOLDER_WEIGHTS)}; point at the "
                                    "checkpoint files themselves")
    return path


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return any((path / name).is_file() for name in FOLDER_WEIGHTS)
    return path.is_file() and path.name.endswith(CHECKPOINT_SUFFIXES)


def find_checkpoints(pattern: str, flag: str) -> List[Path]:
    """The checkpoints ``pattern`` names (``flag`` is the option it came from, for messages): a folder
    that is itself a Hugging Face-style checkpoint, the checkpoints inside a folder, or those a glob
    (``**`` recursing) matches; natural order."""
    given = Path(pattern).expanduser()
    if given.is_dir() and not _is_checkpoint(given):
        matched = list(given.iterdir())
    else:
        matched = [Path(path) for path in glob.glob(str(given), recursive=True)]
    checkpoints = sorted((path for path in matched if _is_checkpoint(path)), key=_natural_key)
    if checkpoints:
        return checkpoints
    kinds = f"{', '.join(CHECKPOINT_SUFFIXES)} files, or folders holding {FOLDER_WEIGHTS[0]}"
    if not matched:
        raise CheckpointImportError(f"{flag} {pattern!r} matches nothing; give a folder of checkpoints or a glob such as "
                                    f"'checkpoints/*.pt' ({kinds})")
    raise CheckpointImportError(f"{flag} {pattern!r} matches {len(matched)} path(s) but no checkpoint ({kinds}), e.g. "
                                f"{sorted(matched, key=_natural_key)[0]}")


def read_checkpoint(path: Path) -> Checkpoint:
    """The state dict stored at ``path`` (a file or a Hugging Face-style folder), unwrapped and with
    its prefixes stripped (see the module docstring)."""
    source = weights_file(Path(path))
    try:
        data = source.read_bytes()
    except OSError as error:
        raise CheckpointImportError(f"cannot read checkpoint {source} ({error.strerror})") from None
    if source.suffix == ".safetensors":
        from safetensors.torch import load

        try:
            stored: Any = load(data)
        except Exception as error:  # safetensors raises several types for truncated/garbled files
            raise CheckpointImportError(f"{source} is not a readable safetensors file ({error})") from None
    else:
        try:
            stored = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling raises many types; its own message is pages long
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointImportError(
                f"{source} cannot be loaded with torch.load(weights_only=True) ({type(error).__name__}: {first_line[:200]}); "
                "save the weights with torch.save(model.state_dict(), path) or as safetensors"
            ) from None
    return Checkpoint(source, bytes_digest(data), _stripped(_state_dict_in(stored, source)))


def _state_dict_in(stored: Any, source: Path) -> Mapping[str, Any]:
    """The state dict in a loaded checkpoint: the mapping itself when its values are tensors, else
    the one under the first of :data:`WRAPPER_KEYS` it holds."""
    if isinstance(stored, Mapping):
        if stored and all(isinstance(value, torch.Tensor) for value in stored.values()):
            return stored
        for key in WRAPPER_KEYS:
            if isinstance(stored.get(key), Mapping):
                return _state_dict_in(stored[key], source)
        keys = ", ".join(repr(key) for key in list(stored)[:LISTED])
        raise CheckpointImportError(
            f"{source} holds a dict (keys {keys or 'none'}) that is neither a state dict nor one under "
            f"{'/'.join(repr(key) for key in WRAPPER_KEYS)}; save torch.save(model.state_dict(), path)"
        )
    raise CheckpointImportError(f"{source} holds a {type(stored).__name__}, not a state dict; save "
                                "torch.save(model.state_dict(), path)")


def _stripped(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    result = {}
    for name, tensor in state.items():
        while name.startswith(STRIPPED_PREFIXES):
            name = name.split(".", 1)[1]
        result[name] = tensor
    return result


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def fit_state_dict(checkpoint: Checkpoint, expected: Mapping[str, torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
    """``checkpoint``'s tensors in the dtypes of ``expected`` (a model's state dict), after checking
    that the names and shapes are the same and the values finite; ``what`` names the model for the
    message."""
    state = checkpoint.state_dict
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    misshaped = [f"{name} {tuple(state[name].shape)} (model: {tuple(tensor.shape)})"
                 for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    problems = [f"{label}: {_listed(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
    if problems:
        raise CheckpointImportError(f"{checkpoint.path} does not fit {what}: {'; '.join(problems)}; check that --arch and "
                                    "--arch-kw build the network the checkpoint was trained as")
    fitted = {name: state[name].to(tensor.dtype) for name, tensor in expected.items()}
    for name, tensor in fitted.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointImportError(f"{checkpoint.path} holds {bad} non-finite value(s) in {name}; a diverged model "
                                        "cannot be imported")
    return fitted
