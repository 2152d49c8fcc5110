"""One loader for every kind of draft file a user can name.

*.safetensors   a hierspec file: a standalone draft (`load_draft`) or, by its ``format``
                metadata, an early-exit head (`load_early_exit`, needs the target)
*.gguf          a transformers model from a GGUF file (`HFModel.from_pretrained`)
a directory     a transformers model directory
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hierspec.models.draft import DraftFileError, load_draft
from hierspec.models.early_exit import FORMAT_EARLY_EXIT, load_early_exit
from hierspec.models.hf import HFModel

__all__ = ["load_draft_model"]


def load_draft_model(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, target: Any = None
) -> Any:
    """The draft model at ``path`` as a `LanguageModel` (see module docstring).

    ``target`` (a transformers model or an HFModel) is needed for early-exit heads, which run the
    target's own first layers. Raises FileNotFoundError / DraftFileError / ValueError.
    """
    spec = os.fspath(path)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"draft {spec!r} does not exist")
    if spec.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(spec, framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception as err:  # safetensors raises its own error types
            raise DraftFileError(f"draft {spec!r} is not a readable safetensors file: {err}") from err
        if fmt == FORMAT_EARLY_EXIT:
            if target is None:
                raise ValueError(f"draft {spec!r} is an early-exit head: it needs the target model")
            return load_early_exit(spec, target.model if isinstance(target, HFModel) else target)
        return load_draft(spec, dtype=dtype)
    if spec.endswith(".gguf"):
        return HFModel.from_pretrained(
            os.path.dirname(spec) or ".", gguf_file=os.path.basename(spec), dtype=dtype
        )
    return HFModel.from_pretrained(spec, dtype=dtype)
