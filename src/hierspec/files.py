"""Atomic file writes: a reader (or a run that was killed mid-write) sees the old file or the whole
new one, never a part of one.

The new content goes to a temporary file in the target's folder, which is flushed to disk
(``fsync``), given its final mode, and renamed over the target (``os.replace`` is atomic on
POSIX). On any error the temporary file is removed and the error propagates. Checkpoints,
weights, data shards, caches and reports are all written this way.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_bytes_atomic", "write_json_atomic"]


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int = 0o644) -> Path:
    """Create or replace ``path`` with what ``write(tmp)`` puts into the temporary file ``tmp``.

    The parent folder is created if needed; ``mode`` defaults to 0644 (mkstemp's 0600 would
    make shared and committed files unreadable to others). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """`write_atomic` of raw bytes."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: str | os.PathLike[str], obj: Any, **dump_kw: Any) -> Path:
    """`write_atomic` of ``obj`` as UTF-8 JSON (``dump_kw`` go to `json.dumps`)."""
    text = json.dumps(obj, **dump_kw)
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
