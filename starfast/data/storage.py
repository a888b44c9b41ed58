"""Where datasets live on disk and how files get there safely.

Owns the data directory (`data_dir` argument, else `$STARFAST_DATA`, else
`~/.cache/starfast`), checksummed downloads with a progress bar, extraction of tar archives,
and array caches. Every file or directory appears under its final name only when complete:
downloads, extractions and caches are written next to their destination under a temporary
name and renamed into place, and removed if anything fails.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from starfast.files import replaced_atomically, write_atomic
from starfast.progress import progress_bar

PathLike = Union[str, os.PathLike]
_CHUNK = 1 << 20


class CorruptDataError(RuntimeError):
    """A downloaded, extracted or cached data file is damaged; the message says what to do."""


def resolve_data_dir(data_dir: Optional[PathLike]) -> Path:
    """`data_dir` if given, else `$STARFAST_DATA`, else `~/.cache/starfast` (not created here)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get("STARFAST_DATA")
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "starfast"


def file_md5(path: PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, destination: PathLike, expected_md5: Optional[str] = None,
             progress: bool = True) -> Path:
    """Fetch `url` into `destination`, checking the md5 checksum when `expected_md5` is given.

    The bytes go to a temporary file beside `destination`, renamed into place only after the
    transfer and the checksum succeed; on any failure nothing is left behind.
    """
    destination = Path(destination)
    with replaced_atomically(destination) as partial:
        digest = hashlib.md5()
        with open(partial, "wb") as out, _open_url(url, destination) as response:
            total = response.headers.get("Content-Length")
            with progress_bar(total=int(total) if total else None, unit="B", unit_scale=True,
                              desc=f"downloading {destination.name}", enabled=progress) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if expected_md5 is not None and digest.hexdigest() != expected_md5.lower():
            raise CorruptDataError(
                f"{url} downloaded with md5 {digest.hexdigest()}, expected {expected_md5}: the "
                f"transfer was incomplete or the file changed; run again to re-download")
    return destination


def _open_url(url: str, destination: Path):
    try:
        return urllib.request.urlopen(url)
    except urllib.error.URLError as error:
        raise ConnectionError(f"cannot download {url} ({error.reason}); check the address and "
                              f"the network, or fetch the file yourself and save it as "
                              f"{destination}") from error


def verify_md5(path: PathLike, expected_md5: str) -> None:
    """Raise `CorruptDataError` naming `path` unless its md5 checksum is `expected_md5`."""
    actual = file_md5(path)
    if actual != expected_md5.lower():
        raise CorruptDataError(
            f"{path} has md5 {actual}, expected {expected_md5}: it is truncated or corrupt; "
            f"delete it and run again to re-download")


def extract_member_dir(archive: PathLike, member_dir: str, destination: PathLike) -> Path:
    """Extract directory `member_dir` of tar `archive` to `destination` (its final path).

    Extraction happens in a temporary directory beside `destination` with tarfile's 'data'
    filter (no absolute paths, links out of the tree or device files); only a complete
    `member_dir` is renamed into place.
    """
    archive, destination = Path(archive), Path(destination)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
            raise CorruptDataError(f"{archive} cannot be extracted ({error}): it is truncated or "
                                   f"corrupt; delete it and run again to re-download") from error
        extracted = staging / member_dir
        if not extracted.is_dir():
            raise CorruptDataError(f"{archive} has no directory {member_dir!r}: it is not the "
                                   f"expected archive; delete it and run again to re-download")
        os.replace(extracted, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def save_arrays(path: PathLike, arrays: Dict[str, np.ndarray]) -> None:
    """Write `arrays` as an uncompressed .npz at `path`, atomically."""
    write_atomic(path, lambda out: np.savez(out, **arrays))


def load_arrays(path: PathLike, names: tuple) -> Dict[str, np.ndarray]:
    """Read arrays `names` from the .npz at `path`; a damaged cache raises `CorruptDataError`."""
    try:
        with np.load(path, allow_pickle=False) as cache:
            return {name: cache[name] for name in names}
    except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile) as error:
        raise CorruptDataError(f"cache {path} is unreadable ({error}); delete it and run again "
                               f"to rebuild it") from error
