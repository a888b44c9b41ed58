"""Atomic files: every file starfast writes appears whole or not at all.

``replaced_atomically(path)`` yields a temporary path beside ``path``; when the block finishes it
gives the file the mode any other program's new file would get (``0o666`` less the umask:
``tempfile.mkstemp`` creates files readable by their owner only), and renames it onto ``path``;
when the block fails the temporary file is removed. ``write_atomic(path, write)`` does the same
for a writer of a binary stream and flushes the data to disk before the rename.
``file_digest(path)`` and ``bytes_digest(data)`` are a content hash of a file's bytes (SHA-256,
which CPUs with SHA extensions compute at 1–2 GB/s, faster than BLAKE2b or MD5 here: see
benchmarks/RESULTS.md): model and star files record it when written and are checked against it
when read.

On top of them, the formats starfast stores: JSON (:func:`write_json`, :func:`read_json`), state
dicts as safetensors (:func:`save_state_dict`, :func:`load_state_dict`) and training checkpoints
(:func:`save_checkpoint`, :func:`load_checkpoint`). A file that cannot be read back raises
:class:`StoredFileError` naming it and what to do. This module knows no directory layout (that is
:mod:`starfast.rundir`'s), so the algorithms that checkpoint their work use it directly.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]
# Temporary files are named .starfast-<name>.<random>.tmp: the cleanup of killed writes
# (RunDir.locked) removes only names starfast itself makes, never a user's own .tmp files.
TEMP_PREFIX, TEMP_SUFFIX = ".starfast-", ".tmp"
TEMP_PATTERN = f"{TEMP_PREFIX}*{TEMP_SUFFIX}"


class StoredFileError(RuntimeError):
    """A stored file is corrupt, unreadable, or was written for other settings."""


# What the disk or the file system says (a full disk, a quota, a read-only mount, no permission):
# named with the file being written. A writer's own errors (a failed download) pass unchanged.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replaced_atomically(path: PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
    os.close(handle)
    try:
        yield Path(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException as error:
        if os.path.exists(temp):
            os.unlink(temp)
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRORS:
            raise StoredFileError(f"cannot write {path} ({error.strerror or error}); free space or fix permissions there, "
                                  "or use another --run-dir: finished work is kept") from error
        raise


def write_atomic(path: PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    with replaced_atomically(path) as temp:
        with open(temp, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda stream: stream.write(text.encode()))


def read_json(path: PathLike) -> Any:
    try:
        with open(path) as stream:
            return json.load(stream)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise StoredFileError(f"{path} is not readable JSON ({error}); delete it and run again to recreate it") from error


def save_state_dict(path: PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> str:
    """Save tensors (moved to CPU, made contiguous and unshared) as safetensors, atomically;
    returns the :func:`bytes_digest` of the file written."""
    from safetensors.torch import save

    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state_dict.items()}
    payload = _canonical_header(save(tensors, metadata=dict(metadata) if metadata else None))
    write_atomic(path, lambda stream: stream.write(payload))
    return bytes_digest(payload)


def _header(data: bytes) -> Tuple[Dict[str, Any], int]:
    """``(header dict, header length)`` of safetensors bytes (an 8-byte little-endian length, then
    that many bytes of JSON); ``ValueError`` when the bytes are not laid out so."""
    if len(data) < 8:
        raise ValueError("shorter than the 8-byte header length")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ValueError(f"header length {length} exceeds the file")
    header = json.loads(data[8 : 8 + length])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, length


def _canonical_header(payload: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes the metadata map in
    a per-process random order, so identical tensors would give files (and recorded SHA-256) that
    differ byte for byte. Tensor offsets count from the end of the header, so rewriting it (padded
    with spaces to a multiple of 8, as safetensors aligns it) leaves the data valid."""
    header, length = _header(payload)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + payload[8 + length :]


def load_state_dict(path: PathLike, device: Union[str, torch.device] = "cpu", digest: Optional[str] = None,
                    expected: Optional[Mapping[str, str]] = None) -> Dict[str, torch.Tensor]:
    """Load a safetensors file; a corrupt file, one whose bytes do not have ``digest`` (when given:
    what :func:`save_state_dict` returned), or one whose header metadata differs from ``expected``
    (e.g. the role and seed its place in a run directory implies) raises :class:`StoredFileError`
    naming it."""
    from safetensors.torch import load

    path = Path(path)
    data = path.read_bytes()
    if digest is not None and bytes_digest(data) != digest:
        raise StoredFileError(
            f"{path} does not match the checksum that its .json sidecar records (the weights or the sidecar changed "
            "on disk, or one was copied from another model); delete it and its .json to train that model again"
        )
    try:
        header, _ = _header(data)
        tensors = load(data)
    except Exception as error:  # safetensors raises several types for truncated/garbled files
        raise StoredFileError(f"{path} is corrupt ({error}); delete it (and its .json) to train that model again") from error
    recorded = header.get("__metadata__") or {}
    for key, value in (expected or {}).items():
        if key in recorded and recorded[key] != value:
            raise StoredFileError(f"{path} holds the model of {key} {recorded[key]!r}, not {value!r} as its place says "
                                  "(a file copied or renamed from elsewhere); put it back or delete it (and its .json)")
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> None:
    """``torch.save`` to a temp file, then rename: a kill never leaves half a checkpoint."""
    write_atomic(path, lambda stream: torch.save(dict(state), stream))


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on CPU)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        # torch's own message is long and suggests weights_only=False; the type is enough here
        raise StoredFileError(
            f"checkpoint {path} is corrupt or not a starfast checkpoint ({type(error).__name__}); delete it to restart "
            "that training from scratch"
        ) from error
