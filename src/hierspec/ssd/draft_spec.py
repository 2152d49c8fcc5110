"""What the SSD speculator process re-creates its draft from: a picklable draft spec.

A spec is one of

    DraftSpec(path, dtype)      a draft file or directory, loaded with THE draft loader
                                `hierspec.models.loading.load_draft_model` (dtype honoured)
    a path (str / PathLike)     the same as DraftSpec(path) (float32)
    a picklable callable        called with no arguments in the speculator; returns the draft
    a picklable LanguageModel   sent as is

The verifier checks a spec cheaply (`check_draft_spec`) before any process starts; the speculator
(and the verifier's local fallback) builds the model with `build_draft_model`. An early-exit head
runs the target's own first layers, which the speculator process does not hold: it is refused up
front (pass a callable that builds the head on a loaded target instead).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..models.base import LanguageModel

__all__ = ["DraftSpec", "build_draft_model", "check_draft_spec"]

_MODEL_ATTRS = ("forward", "crop", "reset", "vocab_size", "max_length")


def is_model(obj: Any) -> bool:
    """Duck-typed `LanguageModel` check (works for models that are not nn.Modules too)."""
    return all(hasattr(obj, a) for a in _MODEL_ATTRS)


@dataclass(frozen=True)
class DraftSpec:
    """A draft file or directory and the dtype to load it in (picklable)."""

    path: str
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"draft dtype: expected a floating torch.dtype, got {self.dtype!r}")

    def load(self) -> LanguageModel:
        from ..models.loading import load_draft_model

        return load_draft_model(self.path, self.dtype)


def _file_format(path: str) -> str | None:
    """The ``format`` metadata of a safetensors file (None if unreadable: the loader reports it)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None


def check_draft_spec(spec: Any) -> None:
    """Cheap checks of a draft spec in the verifier, before any process starts (ValueError)."""
    if isinstance(spec, (str, os.PathLike)):
        spec = DraftSpec(os.fspath(spec))
    if isinstance(spec, DraftSpec):
        if not os.path.exists(spec.path):
            raise ValueError(f"draft: {spec.path!r} does not exist (expected a draft file or directory)")
        if spec.path.endswith(".safetensors"):
            from ..models.early_exit import FORMAT_EARLY_EXIT

            if _file_format(spec.path) == FORMAT_EARLY_EXIT:
                raise ValueError(
                    f"draft: {spec.path!r} is an early-exit head; it runs the target's own layers, "
                    "which the speculator process does not hold (SSD needs a standalone draft)"
                )
    elif not (is_model(spec) or callable(spec)):
        raise ValueError(
            "draft: expected a draft file path, a DraftSpec, a picklable callable returning a "
            f"LanguageModel, or a picklable LanguageModel, got {type(spec).__name__}"
        )


def build_draft_model(spec: Any) -> LanguageModel:
    """The draft `LanguageModel` from its spec (see module docstring); runs in the speculator."""
    check_draft_spec(spec)
    if isinstance(spec, (str, os.PathLike)):
        spec = DraftSpec(os.fspath(spec))
    if isinstance(spec, DraftSpec):
        model = spec.load()
    elif is_model(spec):
        model = spec
    else:
        model = spec()
    if not is_model(model):
        raise ValueError(f"draft: the spec produced a {type(model).__name__}, not a LanguageModel")
    return model
