"""Atomic files: whole or absent, with the umask's permissions like any other program's files."""
import os
import stat

import pytest

from starfast.files import replaced_atomically, save_state_dict, write_atomic, write_json


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_honour_the_umask(tmp_path, umask_022):
    import torch

    write_json(tmp_path / "a.json", {"x": 1})
    save_state_dict(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    with replaced_atomically(tmp_path / "t.md") as temp:  # how the reports and plots are written
        temp.write_text("table")
    for name in ("a.json", "m.safetensors", "t.md"):
        assert mode(tmp_path / name) == 0o644, f"{name}: {oct(mode(tmp_path / name))}"
    os.umask(0o077)
    write_json(tmp_path / "private.json", {})
    assert mode(tmp_path / "private.json") == 0o600


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    (tmp_path / "kept.txt").write_text("old")

    def fail(stream):
        stream.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "kept.txt", fail)
    with pytest.raises(KeyError):
        with replaced_atomically(tmp_path / "new.txt") as temp:
            temp.write_text("half")
            raise KeyError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
    assert (tmp_path / "kept.txt").read_text() == "old"


def test_identical_tensors_give_identical_files_in_different_processes(tmp_path):
    """safetensors writes its metadata map in a per-process random order; starfast's files are
    canonical, so two runs that compute the same tensors record the same SHA-256."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file, safe_open

    script = ("import sys, torch; from starfast.files import save_state_dict; "
              "g = torch.Generator().manual_seed(5); "
              "print(save_state_dict(sys.argv[1], {'b.weight': torch.randn(3, 4, generator=g), 'a': torch.arange(5), "
              "'c.bias': torch.randn(7, generator=g).half()}, {'role': 'sources', 'seed': '7', 'arch': 'mlp', 'set': 'x'}))")
    digests = [subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{i}.safetensors")], capture_output=True,
                              text=True, check=True).stdout.strip() for i in range(4)]
    files = [(tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)]
    assert len(set(digests)) == 1 and len(set(files)) == 1, digests
    loaded = load_file(tmp_path / "0.safetensors")
    g = torch.Generator().manual_seed(5)
    assert torch.equal(loaded["b.weight"], torch.randn(3, 4, generator=g)) and torch.equal(loaded["a"], torch.arange(5))
    assert torch.equal(loaded["c.bias"], torch.randn(7, generator=g).half())
    with safe_open(tmp_path / "0.safetensors", "pt") as stored:
        assert stored.metadata() == {"role": "sources", "seed": "7", "arch": "mlp", "set": "x"}


def test_a_full_disk_names_the_file_and_leaves_nothing_behind(tmp_path):
    import errno

    from starfast.files import StoredFileError

    def full(stream):
        stream.write(b"part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "sources" / "seed-0000.json"
    with pytest.raises(StoredFileError, match=f"cannot write {target} \\(No space left on device\\)"):
        write_atomic(target, full)
    assert list(target.parent.iterdir()) == []
