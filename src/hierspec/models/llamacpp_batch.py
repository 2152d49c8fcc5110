"""Many sequences in one llama.cpp context: one ``llama_decode`` over all their rows.

A `LlamaCppModel` built with ``n_seq_max = S`` holds S KV streams of ``max_length`` positions
each (``kv_unified = False``: a sequence's attention reads only its own cells). `SequenceBatch`
addresses them by seq_id and runs ragged rows of several sequences in one forward::

    decode([Part(seq, tokens, logits), ...])
        batch rows  = concat over parts of (token, pos = length[seq] + i, seq_id = seq, logits flag)
        llama_decode(ctx, batch)                          ONE forward over every row
        returns     = per part: float32 logits [n, V] of its rows (None for a part without logits)
    truncate(seq, n):  llama_memory_seq_rm(mem, seq, n, -1)    roll one sequence back
    free(seq):         llama_memory_seq_rm(mem, seq, -1, -1)   its cells are free at once

Invariant: ``length(seq)`` equals the positions seq holds; after ``truncate(seq, n)`` its state
equals a fresh prefill of its first n tokens up to float rounding. Whether a sequence's rows
round exactly as in a one-sequence forward is measured, not assumed (README, "Serving").
The parent model's own ``forward`` / ``crop`` address seq 0: do not mix both on one context.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .sequences import Part


class SequenceBatch:
    """Ragged multi-sequence forwards over a `LlamaCppModel` (see module docstring); the
    `hierspec.models.sequences.Sequences` protocol."""

    def __init__(self, model: Any, max_rows: int | None = None) -> None:
        self.model = model
        self.num_seqs = int(model.n_seq_max)
        self.max_rows = int(max_rows or model.n_batch)
        if not 1 <= self.max_rows <= model.n_batch:
            raise ValueError(f"max_rows: expected 1..{model.n_batch} (the context's n_batch), got {max_rows}")
        lcp = model._lcp
        self._lcp, self._ctx, self._mem = lcp, model._ctx, model._mem
        batch = lcp.llama_batch_init(self.max_rows, 0, 1)
        self._batch = batch
        self._tok = np.ctypeslib.as_array(batch.token, shape=(self.max_rows,))
        self._pos = np.ctypeslib.as_array(batch.pos, shape=(self.max_rows,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(self.max_rows,))[:] = 1
        self._want = np.ctypeslib.as_array(batch.logits, shape=(self.max_rows,))
        self._seq_ptrs = [batch.seq_id[i] for i in range(self.max_rows)]
        self.vocab_size = int(model.vocab_size)
        self.torch_threads = int(model.torch_threads)
        self.max_length = int(model.max_length)
        self._length = [0] * self.num_seqs
        #: one KV stream per sequence: llama.cpp runs a batch as equal forwards per sequence
        #: (`hierspec.serve.scheduler.ubatch_rows`)
        self.equal_split = not getattr(model, "kv_unified", False)
        model.reset()

    def close(self) -> None:
        if self._batch is not None:
            self._lcp.llama_batch_free(self._batch)
            self._batch = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # ------------------------------------------------------------------ state
    def length(self, seq: int) -> int:
        """Positions held by ``seq``."""
        return self._length[seq]

    def truncate(self, seq: int, n: int) -> None:
        """Drop ``seq``'s positions >= n (0 <= n <= length(seq))."""
        if not 0 <= n <= self._length[seq]:
            raise ValueError(f"truncate: n must lie in 0..{self._length[seq]} for seq {seq}, got {n}")
        if n < self._length[seq]:
            self._lcp.llama_memory_seq_rm(self._mem, seq, n, -1)
            self._length[seq] = n

    def free(self, seq: int) -> None:
        """Forget ``seq`` entirely (its KV cells are reusable at once)."""
        self._lcp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._length[seq] = 0

    def save(self, seq: int) -> tuple[Any, int]:
        """A host copy of ``seq``'s cells (``llama_state_seq_get_data``) and its size in bytes."""
        lcp = self._lcp
        size = int(lcp.llama_state_seq_get_size(self._ctx, seq))
        buf = (ctypes.c_uint8 * size)()
        got = int(lcp.llama_state_seq_get_data(self._ctx, buf, size, seq))
        if got != size:
            raise RuntimeError(f"llama_state_seq_get_data: {got} of {size} bytes for seq {seq}")
        return (buf, self._length[seq]), size

    def restore(self, seq: int, state: Any, n: int) -> None:
        """Put a `save`d copy into ``seq`` (whatever it held is dropped) and keep its first ``n``
        positions."""
        buf, held = state
        if not 0 <= n <= held:
            raise ValueError(f"restore: n must lie in 0..{held}, got {n}")
        self.free(seq)
        if not self._lcp.llama_state_seq_set_data(self._ctx, buf, len(buf), seq):
            self.free(seq)
            raise RuntimeError(f"llama_state_seq_set_data failed for seq {seq} (no room in its cells?)")
        self._length[seq] = held
        self.truncate(seq, n)

    # ------------------------------------------------------------------ the forward
    def decode(self, parts: Sequence[Part]) -> list[torch.Tensor | None]:
        """One llama_decode over every part's rows (see module docstring). Raises ValueError
        for rows past a sequence's context or more rows than ``max_rows``; on a failed decode
        every part's sequence is rolled back and RuntimeError raised."""
        n_rows = sum(len(p.tokens) for p in parts)
        if not 1 <= n_rows <= self.max_rows:
            raise ValueError(f"decode: expected 1..{self.max_rows} rows in all, got {n_rows}")
        r = 0
        for p in parts:
            n, start = len(p.tokens), self._length[p.seq]
            if start + n > self.max_length:
                raise ValueError(f"seq {p.seq}: {n} rows at {start} exceed its context of {self.max_length}")
            self._tok[r : r + n] = p.tokens
            self._pos[r : r + n] = np.arange(start, start + n, dtype=np.int32)
            self._want[r : r + n] = 1 if p.logits else 0
            for i in range(r, r + n):
                self._seq_ptrs[i][0] = p.seq
            r += n
        self._batch.n_tokens = n_rows
        before = {p.seq: self._length[p.seq] for p in parts}
        rc = self._lcp.llama_decode(self._ctx, self._batch)
        if rc != 0:
            for seq, n in before.items():
                self._lcp.llama_memory_seq_rm(self._mem, seq, n, -1)
            raise RuntimeError(f"llama_decode failed: status {rc} ({n_rows} rows, {len(parts)} sequences)")
        for p in parts:
            self._length[p.seq] += len(p.tokens)
        n_out = sum(len(p.tokens) for p in parts if p.logits)
        if n_out == 0:
            return [None] * len(parts)
        v = self.vocab_size
        out = torch.empty((n_out, v), dtype=torch.float32)  # one copy of llama.cpp's output rows
        ctypes.memmove(out.data_ptr(), self._lcp.llama_get_logits(self._ctx), n_out * v * 4)
        res: list[torch.Tensor | None] = []
        o = 0
        for p in parts:
            if p.logits:
                res.append(out[o : o + len(p.tokens)])
                o += len(p.tokens)
            else:
                res.append(None)
        return res
