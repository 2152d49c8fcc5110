"""Where a request's sequence goes in a batch worker's llama.cpp context (`hierspec.serve.batch`):
the seq_id a new prompt takes (the longest reusable prefix, in place or from a host copy; the
lowest free seq_id under llama.cpp's split), and closing a gap in the seq_ids when a request ends
below others (a gap costs a second forward every step). A mixin of `BatchWorker`: these read and
move its sequences, free seq_ids and cached cells."""

from __future__ import annotations

from typing import Any

from .prefix import common_prefix

#: fewer positions than this are not worth a copy to the host, nor a copy back
MIN_CACHED = 16


class Slots:
    """seq_id management for `hierspec.serve.batch.BatchWorker` (see module docstring)."""

    def _compact(self) -> None:
        """Under llama.cpp's split, sequences on non-consecutive seq_ids run as several forwards
        each step: with nobody waiting (who would take the lowest free seq_id anyway), move the
        sequence on the highest seq_id into the gap (its cells copied through host memory, a few
        ms, against a forward saved every step). Its old cells stay as a reusable prefix.
        Called under the lock."""
        if not self.split or self._queue or not hasattr(self.batch, "save") or len(self._active) < 2:
            return
        slots = sorted(s.slot for s in self._active)
        if slots[-1] - slots[0] + 1 == len(slots):
            return
        top = max(self._active, key=lambda s: s.slot)
        if not top.decoding:
            return
        gap = min(f for f in self._free if slots[0] < f < slots[-1])
        self._spill(gap)
        old, n = top.slot, self.batch.length(top.slot)
        try:
            self.batch.restore(gap, self.batch.save(old)[0], n)
        except (RuntimeError, ValueError, MemoryError):  # no room: leave it where it is
            self.batch.free(gap)
            return
        self._free.remove(gap)
        self._free.append(old)
        self._cached[old] = self._held(top)
        top.slot = gap
        self.moves += 1

    def _spill(self, slot: int, kept: int = 0) -> None:
        """``slot``'s cells are about to be overwritten: forget what it cached, copying it to the
        host store first when it holds at least `MIN_CACHED` positions beyond the ``kept`` ones."""
        held = self._cached.pop(slot, [])
        if self.store is not None and len(held) >= kept + MIN_CACHED:
            self.store.put(held, *self.batch.save(slot))

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int, Any]:
        """(free seq_id, positions to keep, cells to copy in or None). The cells: those of the
        free seq_id sharing the longest prefix with ``prompt[:-1]`` (the last prompt token is the
        first decoded row), or a host copy sharing a longer one. Under llama.cpp's split the
        lowest free seq_id is taken (consecutive seq_ids run as one forward) and the cells are
        copied there; otherwise the seq_id that holds them."""
        low = min(self._free)
        if not self.prefix_cache:
            return low, 0, None
        best, keep = low, 0
        for slot in self._free:
            n = common_prefix(self._cached.get(slot, ()), prompt[:-1])
            if n > keep:
                best, keep = slot, n
        if self.store is not None:
            _, state, n = self.store.best(prompt[:-1])
            if n >= keep + MIN_CACHED:
                return low, n, state
        if best == low or not self.split:
            return best, keep, None
        if keep >= MIN_CACHED and hasattr(self.batch, "save"):
            return low, keep, self.batch.save(best)[0]
        return low, 0, None
