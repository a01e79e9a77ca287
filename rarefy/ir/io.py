"""Atomic writes: a file appears whole or not at all, and a failed write names the path.

Any OSError while the temporary file is written (ENOSPC: a full disk) removes it and becomes a
``WriteError`` naming the target; the previous file at the path, if any, is left as it was.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import RarefyError, WriteError


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts get ordinary file permissions
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}", exc.errno) from exc
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, RarefyError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}", exc.errno) from exc
        raise


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
