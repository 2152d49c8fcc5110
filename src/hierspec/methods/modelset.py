"""`ModelSet`: the target and everything a method loads beside it (draft models, early-exit heads,
EAGLE heads), each loaded once and shared by every method of a run.

Draft models go through the one loader, `hierspec.models.loading.load_draft_model` (dtype and
early-exit heads honoured), after a shipped or catalogue name is resolved to its file; a draft
whose vocabulary differs from the target's is refused with one line naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.base import LanguageModel
from .spec import MethodError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

__all__ = ["ModelSet", "backend_of", "hf_module", "resolve_draft"]


def hf_module(model: Any) -> torch.nn.Module | None:
    """The transformers model behind an HFModel (None for other LanguageModels)."""
    m = getattr(model, "model", None)
    return m if m is not None and hasattr(m, "generate") else None


def _to_device(model: Any, device: torch.device) -> None:
    """Move a loaded draft's torch module to the target's device (no-op on the CPU)."""
    module = getattr(model, "model", model)
    if isinstance(module, torch.nn.Module) and torch.device(device).type != "cpu":
        module.to(device)


def backend_of(model: Any) -> str:
    """The backend a LanguageModel runs on: its ``backend`` attribute ('llama.cpp'), else 'torch'."""
    return str(getattr(model, "backend", "torch"))


def resolve_draft(ref: str) -> str:
    """A draft reference as a file path: a shipped draft name, a catalogue name (assembled on
    first use) or a path (as is)."""
    from ..models import shipped

    if ref in shipped.DRAFTS:
        return str(shipped.draft_path(ref))
    try:
        from ..models.catalog import CATALOG, resolve_model
    except ImportError:
        return ref
    if ref in CATALOG:
        return os.fspath(resolve_model(ref).path)
    return ref


@dataclass
class ModelSet:
    """The loaded target (+ tokenizer) and a cache of what methods load beside it.

    ``drafts`` maps a draft reference (as written in the spec) to its loaded model; ``heads``
    maps an exit layer to its early-exit head; both may be filled up front (tests, the bench) or
    lazily by `draft` / `exit_head`.
    """

    target: LanguageModel
    tokenizer: Any = None
    dtype: torch.dtype | None = None  # of drafts and heads loaded here; None: the target's (torch)
    backend: str = "torch"
    drafts: dict[str, Any] = field(default_factory=dict)
    heads: dict[int, Any] = field(default_factory=dict)
    eagles: dict[str | None, Any] = field(default_factory=dict)
    name: str | None = None  # the target's catalogue name, when it has one

    def __post_init__(self) -> None:
        if self.dtype is None:
            own = getattr(self.target, "dtype", None) if self.backend == "torch" else None
            self.dtype = own if isinstance(own, torch.dtype) else torch.float32

    @property
    def hf(self) -> torch.nn.Module | None:
        return hf_module(self.target)

    def draft(self, ref: str, strict: bool = True) -> LanguageModel:
        """The draft model named ``ref`` (loaded once); MethodError on a load failure or, if
        ``strict`` (token-level drafts), a draft from another tokenizer."""
        if ref not in self.drafts:
            from ..models import DraftFileError
            from ..models.loading import load_draft_model

            try:
                path = resolve_draft(ref)
                if strict:
                    self._check_family(ref, path)
                if self.backend == "llama.cpp" and path.endswith(".gguf"):
                    from ..models.llamacpp import LlamaCppModel

                    self.drafts[ref] = LlamaCppModel(path, n_ctx=self.target.max_length)
                else:
                    self.drafts[ref] = load_draft_model(path, self.dtype, self.target)
            except FileNotFoundError:
                raise MethodError(f"draft {ref!r} does not exist") from None
            except (DraftFileError, OSError, ValueError) as err:
                raise MethodError(
                    f"draft {ref!r} (--draft / the method spec) cannot be loaded: {err}"
                ) from None
            _to_device(self.drafts[ref], self.target.device)
        model = self.drafts[ref]
        if strict and model.vocab_size != self.target.vocab_size:
            raise MethodError(
                f"draft {ref!r}: its vocabulary has {model.vocab_size} tokens but the target's has "
                f"{self.target.vocab_size}; a draft must share the target's tokenizer"
            )
        return model

    def draft_tokenizer(self, ref: str) -> Any:
        """The tokenizer of a GGUF or transformers-directory draft (None: hierspec's own draft
        files, which share the target's tokenizer)."""
        try:
            path = resolve_draft(ref)
        except FileNotFoundError:
            raise MethodError(f"draft {ref!r} does not exist") from None
        folder = Path(path).is_dir()
        if not (str(path).endswith(".gguf") or folder):
            return None
        if folder and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
            return None  # a model folder without a tokenizer: the strict (same-vocabulary) path
        from ..drafters.text import load_tokenizer

        try:
            return load_tokenizer(path)
        except (OSError, ValueError) as err:
            raise MethodError(f"draft {ref!r}: its tokenizer cannot be loaded: {err}") from None

    def _check_family(self, ref: str, path: str) -> None:
        """A GGUF draft for a GGUF target must have the target's vocabulary (GGUF metadata only,
        before anything loads)."""
        target_path = getattr(self.target, "path", None)
        if path.endswith(".gguf") and str(target_path or "").endswith(".gguf"):
            from ..models.catalog import same_tokenizer

            if not same_tokenizer(target_path, path):
                raise MethodError(
                    f"draft {ref!r} has another tokenizer than the target {Path(target_path).name}: "
                    "a draft must come from the target's model family (same vocabulary)"
                )

    def exit_head(self, layer: int, path: str | None = None) -> Any:
        """The early-exit head at ``layer`` (``path`` or the shipped one), loaded once."""
        if layer not in self.heads:
            from ..models import DraftFileError, load_early_exit, shipped

            file = path or str(shipped.exit_head_path(layer))
            try:
                head = load_early_exit(file, self.hf, tokenizer=self.tokenizer).head
            except DraftFileError as err:
                raise MethodError(f"exit head {file}: {err}") from None
            if head.config.exit_layer != layer:
                raise MethodError(f"{file} is a head for exit layer {head.config.exit_layer}, not {layer}")
            self.heads[layer] = head
        return self.heads[layer]

    def eagle(self, path: str | None = None) -> Any:
        """The EAGLE head at ``path`` (default the shipped one) on this target, loaded once."""
        if path not in self.eagles:
            from ..models.eagle import load_eagle
            from ..models.shipped import eagle_path

            file = path or str(eagle_path())
            try:
                self.eagles[path] = load_eagle(file, self.target, tokenizer=self.tokenizer)
            except ValueError as err:  # DraftFileError is a ValueError
                raise MethodError(f"EAGLE head {file}: {err}") from None
        return self.eagles[path]
