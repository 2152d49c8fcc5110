"""Atomic file writes: a reader (or a run that was killed mid-write) sees the old file or the whole
new one, never a part of one.

The new content goes to a temporary file in the target's folder, which is flushed to disk
(``fsync``), given its final mode, and renamed over the target (``os.replace`` is atomic on
POSIX). On any error the temporary file is removed and the error propagates. Checkpoints,
weights, data shards, caches and reports are all written this way.

`check_writable_file` / `check_writable_dir` check an output path BEFORE a long run (so that a
command fails in a second, naming its argument, not after minutes of work): the folder must exist
(or, for an output folder, its nearest existing ancestor) and accept a new file, which is probed
with an anonymous temporary file (``O_TMPFILE``: nothing appears, nothing is left).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "check_writable_dir",
    "check_writable_file",
    "write_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
]


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


def _probe_folder(folder: Path) -> str | None:
    """Why a new file cannot be created in ``folder``, or None if it can."""
    if not folder.exists():
        return f"the folder {folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        return f"the folder {folder} is not writable ({err.strerror or err})"
    return None


def check_writable_file(path: str | os.PathLike[str], arg: str) -> None:
    """Raise ValueError naming ``arg`` (e.g. ``"--out"``) unless ``path`` can be written as a
    file: not a folder, its folder exists and accepts new files, and an existing file is
    writable. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        why = "it is a folder"
    elif path.exists() and not os.access(path, os.W_OK):
        why = "the file exists and is not writable"
    else:
        why = _probe_folder(path.absolute().parent)
    if why is not None:
        raise ValueError(f"{arg}: cannot write {path}: {why}")


def check_writable_dir(path: str | os.PathLike[str], arg: str) -> None:
    """Raise ValueError naming ``arg`` unless ``path`` is a writable folder or can be created
    (its nearest existing ancestor is a writable folder). Creates nothing."""
    path = Path(path)
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path.absolute() and not path.is_dir():
        why: str | None = "it exists and is not a folder"
    else:
        why = _probe_folder(existing)
        if why is not None and existing != path.absolute():
            why = f"cannot create it: {why}"
    if why is not None:
        raise ValueError(f"{arg}: cannot write to {path}: {why}")
