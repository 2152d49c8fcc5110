"""Suffix-decoding drafter (Oliaro et al., "SuffixDecoding", 2024; vLLM's ``suffix`` method):
model-free drafts from the frequencies of continuations in the current request and in a cache of
earlier outputs of this process. Deterministic (q one-hot): exact under every rule.

Structures. Two `SuffixIndex`es: ``local`` over the current request (prompt + generated tokens,
extended incrementally each step; rebuilt when a context is not an extension of the last one) and
``global`` over earlier requests' outputs (and prompts with ``cache_prompts``), at most
``max_cached_tokens`` tokens, oldest request evicted first. A `SuffixIndex` answers the questions a
frequency-counted suffix trie answers, exactly:

    count(P)            occurrences of pattern P that have a continuation (the trie node's count)
    children(P)         the next tokens after those occurrences, with their counts

It is a depth-2 *reversed* suffix array: every position e with a continuation (the token at e + 1
belongs to the same request) is one entry with key ``buf[e] << 32 | (buf[e-1] + 1)``, kept sorted
(positions ascending within a key). The occurrences of a pattern ending in token a are the key range
[a << 32, (a+1) << 32), of a pattern ending in (b, a) the single key a << 32 | b + 1 (two binary
searches), and longer patterns filter that range by comparing buf[e - j] for j = 2, 3, ...
Counts are range sizes, so they are exact by construction: inserting a request adds its entries
(a merge into the sorted arrays, O(N) memmove, no re-sort), evicting one removes exactly the
entries it added (and compacts the buffer). About 20 bytes per cached token (int32 token, int64
key, int64 position), where a dict trie of depth D holds up to D Python nodes per token.

Lookup (each step). Match the longest suffix of the context (at most ``max_pattern`` tokens) in
each index; the longer match wins, a tie goes to the local index (the current request is the
better predictor of itself; SuffixDecoding scores candidates by frequency and match length, here
the match length decides and frequencies rank the continuations). From the matched node, walk
greedily to the most frequent child (ties: the most recently seen token), keeping the occurrences
that continue with it, and stop at ``num_tokens`` or when the child's confidence
count(child) / count(node) falls below ``min_confidence``. When no occurrence continues (the match
ran into the end of a request), the walk re-anchors: it matches the context extended by the tokens
drafted so far again (this drafts whole periods of a repeated span instead of one token). Only the
``max_occurrences`` most recent occurrences of the last one or two context tokens are searched and
walked (a cost bound for very common short patterns, whose ratios are then estimated on those;
`SuffixIndex.count` is exact). ``Draft.confidence`` [k] holds the per-position ratios
count(child) / count(node): the raw estimate that position i is accepted given positions < i
were (1.0 along a single remembered occurrence; uncalibrated). ``last_match`` records (source,
match length, occurrences) for a draft-length policy.

Trees (`propose_tree`): best-first expansion of the matched node by path score (product of the
ratios along the path), at most ``spec.topk`` children per node, ``spec.depth`` levels and
``spec.budget`` nodes; node 0 is the last context token, nodes are numbered in expansion order so
parents come before children, and siblings are distinct tokens (deterministic tree).

Cross-request cache. The drafter sees only contexts, so a request's tokens enter the global index
when it ends, i.e. on `reset` (called at the start of the next generation) or when a context that
does not extend the current one arrives. The prompt of a request is the first context seen after
a reset; its generated tokens are what follows (the last step's tokens, never shown to the drafter,
are not cached). `reset` keeps the global cache; `clear_cache` drops it; `add_to_cache` inserts
token sequences directly (e.g. a warm start). A request whose cached part exceeds
``max_cached_tokens`` raises ValueError (0 disables the cache). Batch size 1.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from ..sampling import SamplingParams
from .base import Draft, DraftTree, TreeSpec, check_context

SEP = -1  # request separator / end of buffer (never a token)
_EMPTY = np.zeros(0, dtype=np.int64)
_WINDOW = 8  # pattern tokens compared per vectorised filtering round
_SMALL = 48  # occurrence sets up to this size are counted in plain Python


class SuffixIndex:
    """Exact occurrence counts of patterns (and their next tokens) over a buffer of segments
    (requests) separated by `SEP`; see module docstring. ``pad`` >= the longest pattern."""

    def __init__(self, pad: int = 32) -> None:
        self.pad = pad
        self._buf = np.full(pad + 256, SEP, dtype=np.int32)  # [capacity], SEP beyond _n
        self._n = pad  # used length; buf[:pad] is SEP padding
        self._keys = np.zeros(0, dtype=np.int64)  # [M] sorted
        self._pos = np.zeros(0, dtype=np.int64)  # [M] entry positions, ascending within a key
        self._segments: list[list[int]] = []  # [start, end) of each request, oldest first
        self._open = False  # the last segment still grows
        self._count = 0  # tokens stored

    # ------------------------------------------------------------------ content
    @property
    def num_tokens(self) -> int:
        """Tokens stored (separators excluded)."""
        return self._count

    @property
    def num_segments(self) -> int:
        return len(self._segments)

    def tokens(self, segment: int = -1) -> np.ndarray:
        s, e = self._segments[segment]
        return self._buf[s:e]

    def append(self, tokens: np.ndarray | list[int]) -> None:
        """Append tokens to the open segment (opening one if needed) and index the positions that
        gained a continuation."""
        new = np.asarray(tokens, dtype=np.int64)
        if new.size == 0:
            return
        if new.min() < 0 or new.max() >= 2**31 - 1:
            raise ValueError(f"tokens: expected ids in [0, 2**31 - 1), got [{new.min()}, {new.max()}]")
        if not self._open:
            self._segments.append([self._n, self._n])
            self._open = True
        seg = self._segments[-1]
        old_n, n = self._n, self._n + new.size
        if n + 1 > self._buf.size:  # keep a SEP slot after the end
            grown = np.full(max(2 * self._buf.size, n + 256), SEP, dtype=np.int32)
            grown[:old_n] = self._buf[:old_n]
            self._buf = grown
        self._buf[old_n:n] = new
        self._n = seg[1] = n
        self._count += new.size
        e = np.arange(max(old_n - 1, seg[0]), n - 1)  # positions with a (new) continuation
        if e.size:
            self._insert(e)

    def close(self) -> None:
        """End the open segment (the next `append` starts a new one)."""
        if self._open:
            self._n += 1  # buf[_n] is already SEP
            self._open = False

    def add(self, tokens: np.ndarray | list[int]) -> None:
        """Insert one complete segment."""
        self.close()
        self.append(tokens)
        self.close()

    def _insert(self, e: np.ndarray) -> None:
        buf = self._buf
        keys = (buf[e].astype(np.int64) << 32) | (buf[e - 1].astype(np.int64) + 1)
        order = np.argsort(keys, kind="stable")
        keys, e = keys[order], e[order]
        at = np.searchsorted(self._keys, keys, side="right")  # after older equal keys
        self._keys = np.insert(self._keys, at, keys)
        self._pos = np.insert(self._pos, at, e)

    def evict_to(self, max_tokens: int) -> int:
        """Drop the oldest closed segments until at most `max_tokens` tokens remain; returns the
        number of segments dropped. Their entries (and counts) go with them; the buffer is
        compacted."""
        total, drop = self.num_tokens, 0
        closed = len(self._segments) - (1 if self._open else 0)
        while total > max_tokens and drop < closed:
            s, e = self._segments[drop]
            total -= e - s
            drop += 1
        if drop == 0:
            return 0
        cut = self._segments[drop - 1][1] + 1  # first position kept (after the SEP)
        keep = self._pos >= cut
        shift = cut - self.pad
        self._keys = self._keys[keep]
        self._pos = self._pos[keep] - shift
        rest = self._n - cut
        self._buf[self.pad : self.pad + rest] = self._buf[cut : self._n]
        self._buf[self.pad + rest : self._n] = SEP
        self._n -= shift
        self._segments = [[s - shift, e - shift] for s, e in self._segments[drop:]]
        self._count = total
        return drop

    # ------------------------------------------------------------------ queries
    def match(self, tail: np.ndarray, limit: int | None = None) -> tuple[int, np.ndarray]:
        """Longest suffix of `tail` [m] (m <= pad) that occurs with a continuation: (its length,
        the end positions of its occurrences [c]). (0, []) if none. ``limit``: search only the
        `limit` most recent occurrences of the last one or two tokens (a cost bound)."""
        keys, m = self._keys, len(tail)
        if m == 0 or keys.size == 0:
            return 0, _EMPTY
        a = int(tail[-1])
        k2 = (a << 32) | (int(tail[-2]) + 1) if m > 1 else a << 32
        lo, lo2, hi2, hi = keys.searchsorted([a << 32, k2, k2 + 1, (a + 1) << 32]).tolist()
        if lo == hi:
            return 0, _EMPTY
        if m == 1 or lo2 == hi2:
            pos = self._pos[lo:hi]  # ordered by key, not by position
            if limit is not None and pos.size > limit:
                pos = np.sort(np.partition(pos, pos.size - limit)[-limit:])
            return 1, pos
        if limit is not None:
            lo2 = max(lo2, hi2 - limit)  # positions ascend within a key: keep the latest
        pos, length = self._pos[lo2:hi2], 2
        rev = np.asarray(tail[::-1], dtype=np.int64)  # rev[j] = j tokens back from the end
        while length < m:
            c = min(_WINDOW if pos.size <= 4096 else 1, m - length)
            win = self._buf[pos[:, None] - np.arange(length, length + c)] == rev[length : length + c]
            run = np.cumprod(win, axis=1).sum(1)  # [c] leading matches per occurrence
            best = int(run.max())
            if best == 0:
                break
            pos, length = pos[run == best], length + best
            if best < c:
                break
        return length, pos

    def find(self, pattern: list[int] | np.ndarray) -> np.ndarray:
        """End positions of all occurrences of the whole `pattern` that have a continuation."""
        pat = np.asarray(pattern, dtype=np.int64)
        if pat.size == 0 or pat.size > self.pad:
            raise ValueError(f"pattern: expected 1..{self.pad} tokens, got {pat.size}")
        length, pos = self.match(pat)
        return pos if length == pat.size else _EMPTY

    def count(self, pattern: list[int] | np.ndarray) -> int:
        """Occurrences of `pattern` with a continuation (the suffix-trie node count)."""
        return int(self.find(pattern).size)

    def next_counts(self, pattern: list[int] | np.ndarray) -> dict[int, int]:
        """{next token: count} after the occurrences of `pattern` (sums to `count`)."""
        vals, cnts, _, _ = self.children(self.find(pattern), 1)
        return dict(zip(vals, cnts, strict=True))

    def run(self, start: int, n: int) -> list[int]:
        """Up to `n` tokens from position `start`, stopping before the end of its segment."""
        out = self._buf[start : min(start + n, self._n)].tolist()
        return out[: out.index(SEP)] if SEP in out else out

    def children(self, pos: np.ndarray, depth: int) -> tuple[list[int], list[int], int, np.ndarray]:
        """Continuations of occurrences ending `depth` - 1 tokens before positions `pos` [c]:
        (tokens, counts) sorted by count then recency, the number of occurrences that continue,
        and the next token per occurrence [c] (SEP: none)."""
        nxt = self._buf[np.minimum(pos + depth, self._n)]  # [c]; buf[_n] is SEP
        if nxt.size <= _SMALL:  # plain Python beats numpy's per-call cost on a few occurrences
            count: dict[int, int] = {}
            last: dict[int, int] = {}
            for p, t in zip(pos.tolist(), nxt.tolist(), strict=True):
                if t >= 0:
                    count[t] = count.get(t, 0) + 1
                    last[t] = max(last.get(t, -1), p)
            vals = sorted(count, key=lambda t: (-count[t], -last[t]))
            return vals, [count[t] for t in vals], sum(count.values()), nxt
        ok = nxt >= 0
        total = int(ok.sum())
        if total == 0:
            return [], [], 0, nxt
        uniq, inv, cnts = np.unique(nxt[ok], return_inverse=True, return_counts=True)
        latest = np.full(uniq.size, -1, dtype=np.int64)
        np.maximum.at(latest, inv, pos[ok])
        order = np.lexsort((-latest, -cnts))
        return uniq[order].tolist(), cnts[order].tolist(), total, nxt


@dataclass
class _State:
    """A suffix-trie node: occurrences `pos` of its string in `index`, whose last token lies
    `depth` - 1 positions after pos."""

    index: SuffixIndex
    pos: np.ndarray
    depth: int


@dataclass
class MatchInfo:
    source: str  # "local" | "global" | "none"
    length: int  # matched suffix length (0: no match)
    occurrences: int  # count of the matched node (after the max_occurrences cap)


class SuffixDrafter:
    """Suffix decoding over the current request and a cross-request cache; see module docstring."""

    vocab_size = None

    def __init__(
        self,
        max_pattern: int = 32,
        min_confidence: float = 0.1,
        max_cached_tokens: int = 1_000_000,
        max_occurrences: int = 1024,
        cache_prompts: bool = False,
    ) -> None:
        for name, v, lo in (
            ("max_pattern", max_pattern, 1),
            ("max_cached_tokens", max_cached_tokens, 0),
            ("max_occurrences", max_occurrences, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if not (isinstance(min_confidence, int | float) and 0.0 <= min_confidence <= 1.0):
            raise ValueError(f"min_confidence: expected a number in [0, 1], got {min_confidence!r}")
        self.max_pattern = max_pattern
        self.min_confidence = float(min_confidence)
        self.max_cached_tokens = max_cached_tokens
        self.max_occurrences = max_occurrences
        self.cache_prompts = cache_prompts
        self.global_index = SuffixIndex(pad=max_pattern)
        self.last_match = MatchInfo("none", 0, 0)
        self.reset()

    # ------------------------------------------------------------------ request lifecycle
    def reset(self) -> None:
        """End the current request (its tokens enter the cross-request cache) and forget it."""
        if getattr(self, "local_index", None) is not None:
            self._finish_request()
        self.local_index = SuffixIndex(pad=self.max_pattern)
        self._prompt_len: int | None = None

    def clear_cache(self) -> None:
        """Drop the cross-request cache (the current request is kept)."""
        self.global_index = SuffixIndex(pad=self.max_pattern)

    def add_to_cache(self, tokens: list[int] | np.ndarray | torch.Tensor) -> None:
        """Insert a token sequence as one earlier request (evicting the oldest ones as needed)."""
        arr = np.asarray(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"tokens: expected a 1-D sequence of token ids, got shape {arr.shape}")
        if self.max_cached_tokens == 0 or arr.size == 0:
            return
        self._check_bound(arr.size)
        self.global_index.add(arr)
        self.global_index.evict_to(self.max_cached_tokens)

    @property
    def cached_tokens(self) -> int:
        return self.global_index.num_tokens

    def _cacheable(self) -> np.ndarray:
        if self.local_index.num_segments == 0:
            return _EMPTY
        toks = self.local_index.tokens()
        return toks if self.cache_prompts else toks[self._prompt_len or 0 :]

    def _check_bound(self, n: int) -> None:
        if self.max_cached_tokens and n > self.max_cached_tokens:
            raise ValueError(
                f"max_cached_tokens: {self.max_cached_tokens} is too small for one request, which has "
                f"{n} tokens to cache; raise it (or pass 0 to disable the cross-request cache)"
            )

    def _finish_request(self) -> None:
        toks = self._cacheable()
        if toks.size and self.max_cached_tokens:
            self.add_to_cache(toks.copy())

    def _sync(self, context: torch.Tensor) -> np.ndarray:
        """The context as numpy [L]; extends the local index (or starts a new request)."""
        check_context(context)
        ctx = context[0].cpu().numpy().astype(np.int64)
        idx = self.local_index
        if idx.num_segments:
            have = idx.tokens()
            if have.size > ctx.size or not np.array_equal(have, ctx[: have.size]):
                self.reset()  # not an extension: a new request
                idx = self.local_index
        if self._prompt_len is None:
            self._prompt_len = int(ctx.size)
        n_have = idx.tokens().size if idx.num_segments else 0
        idx.append(ctx[n_have:])
        if self.max_cached_tokens:
            self._check_bound(self._cacheable().size)
        return ctx

    # ------------------------------------------------------------------ lookup
    def _anchor(self, seq: np.ndarray | list[int]) -> _State | None:
        """Longest match of the end of `seq` in both indexes (longer wins, tie: local)."""
        tail = np.asarray(seq[-self.max_pattern :], dtype=np.int64)
        best: tuple[int, int, SuffixIndex, np.ndarray, str] | None = None
        for rank, (name, index) in enumerate((("global", self.global_index), ("local", self.local_index))):
            length, pos = index.match(tail, self.max_occurrences)
            if length and (best is None or (length, rank) > best[:2]):
                best = (length, rank, index, pos, name)
        if best is None:
            self.last_match = MatchInfo("none", 0, 0)
            return None
        length, _, index, pos, name = best
        if pos.size > self.max_occurrences:  # keep the most recent occurrences
            pos = pos[-self.max_occurrences :]
        self.last_match = MatchInfo(name, length, int(pos.size))
        return _State(index, pos, 1)

    def _children(
        self, state: _State, seq: np.ndarray
    ) -> tuple[_State, list[int], list[int], int, np.ndarray]:
        """The node's continuations; re-anchors on `seq` once if no occurrence continues."""
        vals, cnts, total, nxt = state.index.children(state.pos, state.depth)
        if total == 0 and state.depth > 1:
            info = self.last_match
            fresh = self._anchor(seq)
            self.last_match = info
            if fresh is not None:
                state = fresh
                vals, cnts, total, nxt = state.index.children(state.pos, 1)
        return state, vals, cnts, total, nxt

    def propose(
        self,
        context: torch.Tensor,
        num_tokens: int,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> Draft:
        del params, generator  # deterministic
        ctx = self._sync(context)
        out: list[int] = []
        conf: list[float] = []
        state = self._anchor(ctx) if num_tokens > 0 else None
        seq = ctx[-self.max_pattern :].tolist()
        while state is not None and len(out) < num_tokens:
            if state.pos.size == 1:  # a single occurrence: copy its continuation (ratio 1)
                p = int(state.pos[0]) + state.depth
                run = state.index.run(p, num_tokens - len(out))
                if run:
                    out += run
                    conf += [1.0] * len(run)
                    seq = [*seq, *run][-self.max_pattern :]
                    state = _State(state.index, state.pos, state.depth + len(run))
                    continue
            state, vals, cnts, total, nxt = self._children(state, seq)
            if total == 0:
                break
            ratio = float(cnts[0]) / total
            if ratio < self.min_confidence:
                break
            tok = int(vals[0])
            out.append(tok)
            conf.append(ratio)
            seq = [*seq[1 - self.max_pattern :], tok] if self.max_pattern > 1 else [tok]
            state = _State(state.index, state.pos[nxt == tok], state.depth + 1)
        return _make_draft(out, conf, context.device)

    def propose_tree(
        self, context: torch.Tensor, spec: TreeSpec, params: SamplingParams | None = None
    ) -> DraftTree:
        """Best-first tree of the most frequent continuations (see module docstring)."""
        del params
        ctx = self._sync(context)
        tokens, parents = [int(ctx[-1])], [-1]
        heap: list[tuple[float, int, int, int, _State, list[int], int]] = []
        tick = 0

        def expand(node: int, state: _State, seq: list[int], score: float, depth: int) -> None:
            nonlocal tick
            if depth >= spec.depth:
                return
            state, vals, cnts, total, nxt = self._children(state, seq)
            for v, c in zip(vals[: spec.topk], cnts[: spec.topk], strict=True):
                ratio = c / total
                if ratio < self.min_confidence:
                    break
                child = _State(state.index, state.pos[nxt == v], state.depth + 1)
                heapq.heappush(heap, (-score * ratio, tick, node, v, child, seq, depth + 1))
                tick += 1

        root = self._anchor(ctx)
        if root is not None:
            expand(0, root, ctx[-self.max_pattern :].tolist(), 1.0, 0)
        while heap and len(tokens) - 1 < spec.budget:
            neg, _, parent, tok, state, seq, depth = heapq.heappop(heap)
            tokens.append(tok)
            parents.append(parent)
            expand(len(tokens) - 1, state, [*seq, tok][-self.max_pattern :], -neg, depth)
        return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


def _make_draft(tokens: list[int], conf: list[float], device: torch.device) -> Draft:
    """Draft [1, k] (q one-hot) with the per-position confidence [k]."""
    toks = torch.tensor(tokens, dtype=torch.long, device=device).reshape(1, len(tokens))
    return Draft(toks, None, torch.tensor(conf, dtype=torch.float32))
