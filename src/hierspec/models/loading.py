"""One loader for every kind of draft file a user can name.

*.safetensors   a hierspec file: a standalone draft (`load_draft`) or, by its ``format``
                metadata, an early-exit head (`load_early_exit`, needs the target)
*.gguf          a transformers model from a GGUF file (`HFModel.from_pretrained`)
a directory     a transformers model directory

Progress bars: transformers draws a tqdm bar on stderr while it de-quantizes a GGUF ("Converting
and de-quantizing GGUF tensors"), with tqdm directly, so neither its own switch
(``transformers.utils.logging.disable_progress_bar``) nor huggingface_hub's silences it. Under
``--json`` (stderr for errors only; the CLI then sets ``HF_HUB_DISABLE_PROGRESS_BARS=1``) every
load runs inside `quiet_progress`: every tqdm bar created meanwhile (transformers' and the hub's
are tqdm subclasses) is disabled, and tqdm is restored afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hierspec.models.draft import DraftFileError, load_draft
from hierspec.models.early_exit import FORMAT_EARLY_EXIT, load_early_exit
from hierspec.models.hf import HFModel

__all__ = ["load_draft_model", "progress_wanted", "quiet_progress"]

_TRUE = ("1", "true", "yes", "on")


def progress_wanted() -> bool:
    """False when ``HF_HUB_DISABLE_PROGRESS_BARS`` is set to a true value (``--json`` sets it)."""
    return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() not in _TRUE


@contextmanager
def quiet_progress(enabled: bool | None = None) -> Iterator[None]:
    """No progress bars inside the block unless ``enabled`` (None: `progress_wanted`)."""
    if enabled if enabled is not None else progress_wanted():
        yield
        return
    from tqdm import std

    init = std.tqdm.__dict__["__init__"]  # a function or (tqdm >= 4.66) a partialmethod

    def silent_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init.__get__(self, type(self))(*args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = silent_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        std.tqdm.__init__ = init  # type: ignore[method-assign]


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
    with quiet_progress():
        return _load(spec, dtype, target)


def _load(spec: str, dtype: torch.dtype, target: Any) -> Any:
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
