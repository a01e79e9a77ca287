"""Atomic writes: a file appears whole or not at all; a failed write is a rarefy error that names
the path and leaves no temporary file (issue 13, point 9)."""
import errno
import os
import pathlib

import pytest

import rarefy as rf
from rarefy.ir import io as rf_io
from rarefy.ir.errors import WriteError


def test_atomic_write_of_a_new_file_and_a_replacement(tmp_path):
    path = tmp_path / "out" / "a.txt"
    rf_io.atomic_write_text(path, "one")
    rf_io.atomic_write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["a.txt"]


def test_a_full_disk_is_a_write_error_and_leaves_nothing_partial(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("previous")
    real = pathlib.Path.write_bytes

    def half_then_enospc(self, data):
        real(self, data[:1])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_enospc)
    with pytest.raises(rf.RarefyError, match=f"cannot write {path}: No space left on device") as info:
        rf_io.atomic_write_text(path, "new text")
    assert isinstance(info.value, WriteError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["a.txt"]


def test_a_failure_that_is_not_a_write_error_is_not_rewrapped(tmp_path):
    with pytest.raises(KeyError):
        with rf_io.atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("x")
            raise KeyError("not a disk problem")
    assert os.listdir(tmp_path) == []
