"""Training errors and resumable checkpoints.

A checkpoint (every ``ckpt_every`` steps and at the end of `hierspec.train.distill.train`) is
written to a temporary file and renamed, and framed with a magic string, a length and a sha256,
so a truncated or corrupt file is refused with `CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path
from typing import Any

import torch

from hierspec.files import write_bytes_atomic

__all__ = ["CheckpointError", "TrainError", "load_checkpoint", "save_checkpoint"]

_MAGIC = b"HSCKPT01"
_HEADER = struct.Struct("<8s32sQ")  # magic, sha256 of payload, payload length


class TrainError(RuntimeError):
    """Training cannot start or continue (existing run, incompatible checkpoint, ...)."""


class CheckpointError(TrainError):
    """A checkpoint file is missing, truncated, corrupt, or not a hierspec checkpoint."""


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` (torch-serialisable) framed with magic + length + sha256."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    header = _HEADER.pack(_MAGIC, hashlib.sha256(data).digest(), len(data))
    write_bytes_atomic(path, header + data)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; `CheckpointError` if it is not intact."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    raw = path.read_bytes()
    if len(raw) < _HEADER.size or not raw.startswith(_MAGIC):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a hierspec training checkpoint (or is truncated)"
        )
    _, digest, length = _HEADER.unpack_from(raw)
    data = raw[_HEADER.size :]
    if len(data) != length:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated ({len(data)} of {length} payload bytes); "
            "delete it to restart, or restore a copy"
        )
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt (sha256 mismatch); delete it or restore a copy"
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pragma: no cover - the sha256 check catches damage first
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be decoded: {err}") from err
