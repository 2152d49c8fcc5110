"""The draft file format: the target's identity, checked safetensors I/O, and the head-file
helpers shared by every hierspec model file (standalone drafts, early-exit and EAGLE heads).

File format: ONE safetensors file, weights in fp16 (or bf16) plus ``vocab_map`` (int64), and in
the metadata ``format``, ``format_version``, ``config`` (JSON), ``target`` (JSON identity of the
target: vocab size, hidden size, layers, tokenizer fingerprint) and ``sha256`` (of every tensor's
bytes). Readers raise `DraftFileError` when a file is truncated or corrupt, was made for another
target, or its vocab_map is invalid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hierspec.files import write_atomic

__all__ = [
    "FORMAT_DRAFT",
    "FORMAT_VERSION",
    "HALF_DTYPES",
    "DraftFileError",
    "TargetIdentity",
    "check_vocab_map",
    "load_head_state",
    "parse_json_meta",
    "read_head_file",
    "read_safetensors",
    "storage_dtype",
    "target_identity",
    "tokenizer_fingerprint",
    "write_head_file",
    "write_safetensors",
]

FORMAT_DRAFT = "hierspec.draft"
FORMAT_VERSION = 1
HALF_DTYPES = (torch.float16, torch.bfloat16)


class DraftFileError(ValueError):
    """A draft / head file is unreadable, corrupt, or made for another target."""


# ============================================================================ target identity
def tokenizer_fingerprint(tokenizer: Any, n: int = 1000) -> str:
    """sha256 (first 16 hex digits) of the first ``n`` token strings of a HF tokenizer.

    Two tokenizers with the same fingerprint map the first ``n`` ids to the same strings; with
    equal vocabulary sizes that identifies the tokenizer in practice.
    """
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(n, size))))
    blob = "\x00".join("" if t is None else str(t) for t in tokens)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class TargetIdentity:
    """What a draft file records about the target it was made for.

    vocab_size: width of the target's logits (the only thing a standalone draft depends on).
    hidden_size / num_layers: the target's residual width and depth (an early-exit head depends
        on them; informational for a standalone draft).
    tokenizer: `tokenizer_fingerprint` of the target's tokenizer, or None if unknown.
    name: free-form label (e.g. "SmolLM2-135M-Instruct"), never checked.
    """

    vocab_size: int
    hidden_size: int | None = None
    num_layers: int | None = None
    tokenizer: str | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetIdentity:
        known = {f.name for f in fields(cls)}
        if not isinstance(d, Mapping) or "vocab_size" not in d:
            raise DraftFileError("the file's target identity has no vocab_size")
        return cls(**{k: v for k, v in d.items() if k in known})

    def check(self, other: TargetIdentity, *, what: str, strict_shape: bool = False) -> None:
        """Raise `DraftFileError` if ``other`` (the actual target) is not the one recorded here.

        vocab_size must match; the tokenizer fingerprint must match when both are known;
        with ``strict_shape`` hidden_size and num_layers must match too when both are known.
        """
        if self.vocab_size != other.vocab_size:
            raise DraftFileError(
                f"{what} was made for a target with vocabulary size {self.vocab_size}, but this "
                f"target has {other.vocab_size}: it belongs to another model / tokenizer"
            )
        if self.tokenizer and other.tokenizer and self.tokenizer != other.tokenizer:
            raise DraftFileError(
                f"{what} was made for another tokenizer (fingerprint {self.tokenizer}, this "
                f"target's tokenizer has {other.tokenizer}); token ids would not mean the same"
            )
        if strict_shape:
            for name in ("hidden_size", "num_layers"):
                mine, theirs = getattr(self, name), getattr(other, name)
                if mine is not None and theirs is not None and mine != theirs:
                    raise DraftFileError(
                        f"{what} was made for a target with {name}={mine}, but this target has {theirs}"
                    )


def target_identity(model: Any, tokenizer: Any = None, *, name: str | None = None) -> TargetIdentity:
    """`TargetIdentity` of a transformers causal LM or an ``HFModel`` (optionally its tokenizer)."""
    hf = getattr(model, "model", model) if not hasattr(model, "get_output_embeddings") else model
    config = hf.config.get_text_config(decoder=True)
    head = hf.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(config.vocab_size)
    return TargetIdentity(
        vocab_size=vocab,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        tokenizer=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        name=name or getattr(config, "_name_or_path", None) or None,
    )


# ============================================================================ checked safetensors I/O
def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` + ``metadata`` (+ a ``sha256`` of the tensors) atomically (temp + rename)."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**{k: str(v) for k, v in metadata.items()}, "sha256": _tensor_digest(data)}
    write_atomic(path, lambda tmp: save_file(data, str(tmp), metadata=meta))


def read_safetensors(
    path: str | os.PathLike[str], *, what: str = "file", expect_format: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by `write_safetensors`; `DraftFileError` if missing, truncated or corrupt.

    Checks the recorded sha256 of the tensors and, if ``expect_format`` is given, the ``format``
    metadata entry.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DraftFileError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise DraftFileError(
            f"{what} {str(path)!r} is truncated or corrupt (not a readable safetensors file): {err}"
        ) from err
    if expect_format is not None and metadata.get("format") != expect_format:
        raise DraftFileError(
            f"{what} {str(path)!r} is not a {expect_format} file (format={metadata.get('format')!r})"
        )
    digest = metadata.get("sha256")
    if digest is None:
        raise DraftFileError(f"{what} {str(path)!r} has no sha256 entry: not written by hierspec")
    if _tensor_digest(tensors) != digest:
        raise DraftFileError(f"{what} {str(path)!r} is corrupt: its tensors do not match their sha256")
    return tensors, metadata


def parse_json_meta(metadata: Mapping[str, str], key: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as err:
        raise DraftFileError(f"{what}: metadata entry {key!r} is missing or not JSON") from err
    if not isinstance(value, dict):
        raise DraftFileError(f"{what}: metadata entry {key!r} is not a JSON object")
    return value


def check_vocab_map(vocab_map: torch.Tensor, vocab_size: int, *, what: str = "vocab_map") -> torch.Tensor:
    """Validate a vocab_map: 1-D, non-empty, integer, unique ids in [0, vocab_size). Returns int64."""
    if not isinstance(vocab_map, torch.Tensor) or vocab_map.ndim != 1 or vocab_map.numel() == 0:
        raise DraftFileError(f"{what} must be a non-empty 1-D tensor of target token ids")
    if vocab_map.is_floating_point() or vocab_map.dtype == torch.bool or vocab_map.is_complex():
        raise DraftFileError(f"{what} must hold integer token ids, got dtype {vocab_map.dtype}")
    vm = vocab_map.to(torch.long).cpu()
    lo, hi = int(vm.min()), int(vm.max())
    if lo < 0 or hi >= vocab_size:
        raise DraftFileError(
            f"{what} has token ids in [{lo}, {hi}], outside the target vocabulary [0, {vocab_size})"
        )
    if torch.unique(vm).numel() != vm.numel():
        raise DraftFileError(f"{what} holds duplicate token ids")
    if vm.numel() > vocab_size:
        raise DraftFileError(f"{what} has {vm.numel()} entries, more than the vocabulary {vocab_size}")
    return vm


def write_head_file(
    path: str | os.PathLike[str],
    fmt: str,
    module: nn.Module,
    config: Any,
    target: TargetIdentity,
    signature: list[float],
    *,
    dtype: torch.dtype = torch.float16,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a head that runs on a frozen target (early exit, EAGLE): its weights in fp16/bf16
    (`storage_dtype`), ``vocab_map`` (int64) if it has one, and metadata ``format`` = fmt,
    ``format_version`` 1, ``config`` (JSON of ``config.to_dict()``), ``target`` (identity),
    ``signature`` (of the target weights it relies on) and ``info`` (``extra``)."""
    weights = {k: v for k, v in module.state_dict().items() if k != "vocab_map"}
    sdt = storage_dtype(weights, dtype)
    tensors = {k: v.to(sdt) for k, v in weights.items()}
    vm = getattr(module, "vocab_map", None)
    if vm is not None:
        tensors["vocab_map"] = vm.to(torch.long)
    meta = {
        "format": fmt,
        "format_version": "1",
        "config": json.dumps(config.to_dict()),
        "target": json.dumps(target.to_dict()),
        "signature": json.dumps(signature),
        "info": json.dumps(dict(extra or {})),
    }
    write_safetensors(path, tensors, meta)


def read_head_file(
    path: str | os.PathLike[str], fmt: str, what: str, config_cls: Any
) -> tuple[dict[str, torch.Tensor], Any, TargetIdentity, Any, str]:
    """Read a `write_head_file` file: (tensors, config, recorded target identity, signature (JSON
    value, None if absent), the ``what`` prefix for errors); `DraftFileError` if it is missing,
    corrupt, of another format or version, or has an invalid config."""
    tensors, meta = read_safetensors(path, what=what, expect_format=fmt)
    what = f"{what} {str(path)!r}"
    if meta.get("format_version") != "1":
        raise DraftFileError(f"{what} has format_version {meta.get('format_version')!r}, expected 1")
    try:
        config = config_cls.from_dict(parse_json_meta(meta, "config", what))
    except (TypeError, ValueError) as err:
        raise DraftFileError(f"{what} has an invalid config: {err}") from err
    recorded = TargetIdentity.from_dict(parse_json_meta(meta, "target", what))
    try:
        signature = json.loads(meta.get("signature", "null") or "null")
    except ValueError:
        signature = None
    return tensors, config, recorded, signature, what


def load_head_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a head file's weights (all but vocab_map, which the module already holds) into
    ``module`` in float32; `DraftFileError` naming missing / unexpected weights."""
    expected = {k for k in module.state_dict() if k != "vocab_map"}
    if set(tensors) != expected:
        raise DraftFileError(
            f"{what}: weights do not match its config (missing {sorted(expected - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - expected)})"
        )
    try:
        module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    except RuntimeError as err:
        raise DraftFileError(f"{what}: weights do not match its config: {err}") from err


def storage_dtype(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.dtype:
    """fp16 unless a value would overflow it (then bf16); bf16 stays bf16."""
    if dtype not in HALF_DTYPES:
        raise ValueError(f"weights are stored as float16 or bfloat16, got {dtype}")
    if dtype == torch.float16:
        big = max((float(t.detach().abs().max()) for t in tensors.values() if t.numel()), default=0.0)
        if not math.isfinite(big) or big > 6.0e4:
            return torch.bfloat16
    return dtype
