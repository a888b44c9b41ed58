"""What verifying a stored model costs: loading a ResNet-18 file (44.7 MB) with its SHA-256
checked (``files.load_state_dict(..., digest=...)``, what every load of a run directory's model
or star does) against the plain load, and the candidate hashes on the same bytes (the choice of
SHA-256 in ``starfast.files``)."""
import hashlib
import zlib

import pytest

from starfast import models
from starfast.files import file_digest, load_state_dict, save_state_dict


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("checksums") / "resnet18.safetensors"
    digest = save_state_dict(path, models.build("resnet18").state_dict())
    return path, digest


def test_load_plain(bench, resnet18_file):
    path, _ = resnet18_file
    bench("load resnet18 file", "baseline", lambda: load_state_dict(path), rounds=10)


def test_load_verified(bench, resnet18_file):
    path, digest = resnet18_file
    bench("load resnet18 file", "ours", lambda: load_state_dict(path, digest=digest), rounds=10)


@pytest.mark.parametrize("name, digest", [
    ("sha256", lambda data: hashlib.sha256(data).hexdigest()),
    ("blake2b", lambda data: hashlib.blake2b(data).hexdigest()),
    ("md5", lambda data: hashlib.md5(data).hexdigest()),
    ("crc32", lambda data: zlib.crc32(data)),
])
def test_hashes(bench, resnet18_file, name, digest):
    path, _ = resnet18_file
    data = path.read_bytes()
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    bench("hash 44.7 MB", "ours" if name == "sha256" else name, lambda: digest(data), rounds=10)
