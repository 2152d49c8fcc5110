"""Several sequences behind one interface, for the server's batch worker.

    decode([Part(seq, tokens, logits), ...]) -> per part: logits [n, V] or None
    truncate(seq, n) / free(seq) / length(seq)
    save(seq) -> (state, bytes) / restore(seq, state, n)   a copy of a sequence's cells, put back
                                                           later into any seq_id (prefix caching)

Two implementations: `hierspec.models.llamacpp_batch.SequenceBatch` (one llama.cpp context, ONE
``llama_decode`` over every part's rows) and `ModelSequences` here (one `LanguageModel` per
sequence, parts run one after another: any torch model, e.g. the tiny models of the exactness
tests; correct, but no batching gain).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .base import LanguageModel


@dataclass
class Part:
    """Rows of one sequence in a batch: ``tokens`` at its next positions; logits for all of
    them (``logits=True``, decoding) or for none (a prompt chunk whose rows nobody reads)."""

    seq: int
    tokens: Sequence[int]
    logits: bool = True


class Sequences(Protocol):
    """What the batch worker needs (see module docstring)."""

    num_seqs: int
    max_rows: int
    max_length: int
    vocab_size: int

    @property
    def device(self) -> torch.device: ...

    def decode(self, parts: Sequence[Part]) -> list[torch.Tensor | None]: ...

    def truncate(self, seq: int, n: int) -> None: ...

    def free(self, seq: int) -> None: ...

    def length(self, seq: int) -> int: ...

    def save(self, seq: int) -> tuple[Any, int]: ...

    def restore(self, seq: int, state: Any, n: int) -> None: ...


class ModelSequences:
    """``num_seqs`` sequences, each on its own model from ``make_model()`` (see module docstring)."""

    def __init__(self, make_model: Callable[[], LanguageModel], num_seqs: int, max_rows: int = 512) -> None:
        if num_seqs < 1:
            raise ValueError(f"num_seqs: expected >= 1, got {num_seqs}")
        self.models = [make_model() for _ in range(num_seqs)]
        self.num_seqs, self.max_rows = num_seqs, max_rows
        self.max_length = int(self.models[0].max_length)
        self.vocab_size = int(self.models[0].vocab_size)

    @property
    def device(self) -> torch.device:
        return self.models[0].device

    def decode(self, parts: Sequence[Part]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for p in parts:
            m = self.models[p.seq]
            ids = torch.tensor([list(p.tokens)], dtype=torch.long, device=m.device)
            logits = m.forward(ids).logits[0]
            out.append(logits if p.logits else None)
        return out

    def truncate(self, seq: int, n: int) -> None:
        self.models[seq].crop(n)

    def free(self, seq: int) -> None:
        self.models[seq].reset()

    def length(self, seq: int) -> int:
        return self.models[seq].cache_length

    def save(self, seq: int) -> tuple[Any, int]:
        """A deep copy of the sequence's model (its cache is the state); its size is nominal."""
        return copy.deepcopy(self.models[seq]), 1

    def restore(self, seq: int, state: Any, n: int) -> None:
        model = copy.deepcopy(state)
        if not 0 <= n <= model.cache_length:
            raise ValueError(f"restore: n must lie in 0..{model.cache_length}, got {n}")
        model.crop(n)
        self.models[seq] = model
