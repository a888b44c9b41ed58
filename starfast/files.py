"""Atomic files: every file starfast writes appears whole or not at all.

``replaced_atomically(path)`` yields a temporary path beside ``path``; when the block finishes it
gives the file the mode any other program's new file would get (``0o666`` less the umask:
``tempfile.mkstemp`` creates files readable by their owner only), and renames it onto ``path``;
when the block fails the temporary file is removed. ``write_atomic(path, write)`` does the same
for a writer of a binary stream and flushes the data to disk before the rename.
``file_digest(path)`` is a fast content hash (BLAKE2b) of a file's bytes.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replaced_atomically(path: PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(handle)
    try:
        yield Path(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def write_atomic(path: PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    with replaced_atomically(path) as temp:
        with open(temp, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())


def file_digest(path: PathLike) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
