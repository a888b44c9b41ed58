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
