"""`BatchWorker`: continuous batching with exact speculation per request, on llama.cpp.

One llama.cpp context holds up to ``max_batch`` sequences (a seq_id per request,
`hierspec.models.llamacpp_batch.SequenceBatch`). Each scheduler step:

    admit     queued requests take free seq_ids (the one whose cells hold the longest prefix
              of the prompt: those positions are not prefilled again); cancelled ones free
              theirs at once
    propose   every decoding sequence's drafter proposes up to k_max tokens (`hierspec.step.propose`)
    allocate  the scheduler keeps k_i of them (`hierspec.serve.scheduler.allocate`: expected
              tokens per second of the whole batch from the batched cost curve c(R))
    forward   ONE llama_decode: per decoding sequence [x_L, X_1..X_k_i] (logits on), plus chunks
              of the prompts being prefilled (logits off), so new requests never stall the others;
              rows in seq_id order, and new requests take the lowest free seq_id: llama.cpp runs
              a batch of equal rows per sequence at consecutive seq_ids as one forward, else
              splits it (`hierspec.serve.scheduler.ubatch_rows`, which the allocation costs)
    verify    per sequence, its own rule and streams (`hierspec.step.verify_rows`): ragged tau_i
    commit    EOS / stop strings (`hierspec.output.Output`), events to the app, and each sequence
              rolled back on its own: llama_memory_seq_rm(seq_i, L_i + tau_i, -1)

Exactness per request: a sequence's rows, rule and random streams are its own (seeded by the
request's seed and keyed by position, `hierspec.rng`), so each response is distributed exactly as
the target's law for that request alone; with a deterministic draft (n-gram, suffix, or none) a
seeded response is the text plain sampling gives with that seed, whatever else is in the batch
and whatever lengths the scheduler chose -- as far as llama.cpp's rows for a sequence do not
depend on the other rows of the batch (measured: README, "Serving").

Prefix reuse (what llama-server's ``cache_prompt`` and vLLM's prefix caching do): a finished
sequence leaves its cells in place, holding the tokens of its prompt and answer but the last; a
new request takes the free seq_id sharing the longest prefix with its prompt, the rest of the
cells is dropped (``llama_memory_seq_rm``) and only the remainder is prefilled. A follow-up turn
of a chat, or the same prompt again, then starts at once. The cached positions are the same
tokens at the same positions, so the law is unchanged; their keys and values were computed in
other batches, which llama.cpp may round differently (the identity rates in the README).

Methods: ``ar`` and the lookup drafters (``ngram``, ``suffix``), each request with its own
drafter instance; gamma "auto" lets the scheduler choose, an integer fixes k_i = min(gamma, draft).
Other methods need a draft model's own forward per request and run on the serial worker
(`hierspec serve --method ...` picks it).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..acceptance import AcceptanceModel, SequenceAcceptance
from ..curve import OnlineCostCurve
from ..drafters.base import Draft
from ..methods import ENTRIES, entry_of, lookup_drafter, parse_method
from ..models.llamacpp_batch import SequenceBatch
from ..models.sequences import Part, Sequences
from ..output import Output
from ..rng import Streams
from ..stats import SpecStats
from ..step import StepContext, propose, verify_rows
from ..verify import get_rule
from .prefix import PrefixStore
from .scheduler import DraftGuard, Layout, allocate, gains_from, ubatch_rows
from .slots import Slots
from .worker import DoneEvent, GenRequest, QueueFull, Sink, TokenEvent

BATCH_METHODS = tuple(kind for kind, e in ENTRIES.items() if e.batched)
CURVE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass
class _Seq:
    """One request in flight on seq_id ``slot``."""

    req: GenRequest
    sink: Sink
    slot: int
    ctx: StepContext
    output: Output
    budget: int
    fixed_gamma: int  # 0: the scheduler chooses
    t_submit: float
    prefilled: int = 0  # prompt tokens (of prompt[:-1]) in the cache
    context: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 0, dtype=torch.long))
    buf: torch.Tensor | None = None  # holds the context: prompt, then room for the budget
    draft: Draft | None = None
    conf: list[float] = field(default_factory=list)
    local: SequenceAcceptance | None = None  # this sequence's acceptance (auto-gamma drafting)
    t_first: float | None = None
    t_start: float | None = None

    @property
    def decoding(self) -> bool:
        return self.prefilled >= len(self.req.prompt_ids) - 1


class BatchWorker(Slots):
    """Continuous batching over ``seqs`` (`hierspec.models.sequences.Sequences`: a llama.cpp
    context with several sequences, `SequenceBatch`; see module docstring) and the cost prior
    c(R) of its forwards (`from_llamacpp` measures it). ``method`` / ``gamma`` / ``rule``:
    defaults for requests that do not set them (gamma 0 = auto). ``prefill_chunk``: most prompt
    rows per step while other sequences decode. ``prefix_cache``: reuse the cells of finished
    sequences for prompts that share a prefix, in place and from up to ``cache_bytes`` of host
    copies (`hierspec.serve.prefix`; 0: in place only)."""

    def __init__(
        self,
        seqs: Sequences,
        tokenizer: Any,
        *,
        method: str = "ngram",
        gamma: int = 0,
        rule: str = "block",
        max_queue: int = 64,
        k_max: int = 8,
        prefill_chunk: int = 128,
        eos_token_id: Any = None,
        cost_prior: Callable[[int], float],
        prefix_cache: bool = True,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.tokenizer = tokenizer
        self.batch = seqs
        self.max_batch = int(seqs.num_seqs)
        self.method, self.gamma, self.rule = method, gamma, rule
        self.check_method(method)
        self.max_queue = max_queue
        self.k_max = k_max
        self.prefill_chunk = prefill_chunk
        self.eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        # c(R) learned online up to every sequence drafting k_max (prefill-mixed steps run past
        # it and are extrapolated); an untrusted prior (a busy host) counts for little
        trusted = bool(getattr(cost_prior, "trusted", True))
        self.costs = OnlineCostCurve(cost_prior, self.max_batch * (k_max + 1), trusted=trusted)
        self._costs_by_seqs: dict[int, OnlineCostCurve] = {1: self.costs}
        self.acceptance: dict[str, AcceptanceModel] = {}
        self._queue: collections.deque[tuple[GenRequest, Sink, float]] = collections.deque()
        self._active: list[_Seq] = []
        self._free = list(range(self.max_batch))
        self._cached: dict[int, list[int]] = {}  # free seq_id -> the tokens its cells hold
        self.prefix_cache = prefix_cache
        can_copy = prefix_cache and cache_bytes > 0 and hasattr(seqs, "save")
        self.store = PrefixStore(cache_bytes) if can_copy else None
        self._cancel: set[str] = set()
        self._lock = threading.Condition()
        self._stopping = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.forwards = 0  # llama.cpp forwards (ubatches) run, all steps
        #: llama.cpp splits a batch into equal forwards per sequence (one KV stream each)
        self.split = bool(getattr(seqs, "equal_split", False))
        self.rows_hist: collections.Counter[int] = collections.Counter()
        self.draft_rows = 0  # drafted rows the scheduler kept, all steps
        self.decode_rows = 0  # rows of decoding sequences (1 + k_i each), all steps
        self.guard = DraftGuard()  # drafting held back where it measures slower than not
        self.moves = 0  # sequences moved to close a gap in seq_ids (`_compact`)

    @classmethod
    def from_llamacpp(cls, model: Any, tokenizer: Any, **kw: Any) -> BatchWorker:
        """A worker over a `LlamaCppModel` opened with ``n_seq_max`` = the batch size; the cost
        prior is the host's measured curve of up to 32 rows (`hierspec.costs.cost_curve`)."""
        from ..costs import cost_curve

        seqs = SequenceBatch(model)
        sizes = tuple(n for n in CURVE_SIZES if n <= seqs.max_rows)
        prior = cost_curve(model, sizes=sizes)
        model.reset()
        return cls(seqs, tokenizer, cost_prior=prior, **kw)

    # ------------------------------------------------------------------ the Worker protocol
    @staticmethod
    def check_method(text: str) -> None:
        """ValueError (naming ``method``) unless this worker can batch the method."""
        if not entry_of(parse_method(text)).batched:
            raise ValueError(
                f"method: {text!r} is not batched (the batching worker runs {', '.join(BATCH_METHODS)}); "
                f"start the server with --method {text} to serve it one request at a time"
            )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hierspec-batch", daemon=True)
        self._thread.start()

    def submit(self, request: GenRequest, sink: Sink) -> None:
        self.check_method(request.method or self.method)
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue {self.max_queue})")
            self._queue.append((request, sink, time.perf_counter()))
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancel.add(request_id)
            self._lock.notify()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
            self._deadline = time.perf_counter() + timeout_s
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout_s + 5.0)

    def status(self) -> dict[str, Any]:
        with self._lock:
            queued, running = len(self._queue), len(self._active)
        return {
            "worker": "batch",
            "queued": queued,
            "running": running,
            "max_batch": self.max_batch,
            "steps": self.steps,
            "forwards": self.forwards,
            "draft_rows": self.draft_rows,
            "decode_rows": self.decode_rows,
            "moves": self.moves,
            "draft_guard_tok_s": self.guard.snapshot(),
            "cost_curve_ms": {r: round(1e3 * self.costs(r), 2) for r in CURVE_SIZES},
            "prefix_cache": {
                "on": self.prefix_cache,
                "host_copies": 0 if self.store is None else len(self.store),
                "host_bytes": 0 if self.store is None else self.store.used,
            },
        }

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        n = getattr(self.batch, "torch_threads", None)  # llama.cpp: 1 (`LlamaCppModel.torch_threads`)
        if n is not None:
            torch.set_num_threads(n)
        while True:
            with self._lock:
                while not self._queue and not self._active and not self._stopping and not self._cancel:
                    self._lock.wait()
                if self._stopping and not self._active and not self._queue:
                    return
                cancelled, self._cancel = self._cancel, set()
                late = self._deadline is not None and time.perf_counter() > self._deadline
                self._admit(cancelled)
                self._compact()
            for s in [s for s in self._active if s.req.request_id in cancelled or late]:
                self._finish(s, "cancelled")
            if self._active:
                try:
                    self._step()
                except Exception as err:  # a failed forward ends its requests, never the worker
                    for s in list(self._active):
                        self._finish(s, "error", f"{type(err).__name__}: {err}")

    def _admit(self, cancelled: set[str]) -> None:
        """Move queued requests to free seq_ids (called under the lock)."""
        kept = collections.deque()
        for req, sink, t in self._queue:
            if req.request_id in cancelled:
                sink(DoneEvent(req.request_id, [], "cancelled", SpecStats()))
            elif self._free and not self._stopping:
                slot, reuse, state = self._pick_slot(req.prompt_ids)
                self._free.remove(slot)
                self._active.append(self._new_seq(req, sink, t, slot, reuse, state))
            elif self._stopping:
                sink(DoneEvent(req.request_id, [], "cancelled", SpecStats()))
            else:
                kept.append((req, sink, t))
        self._queue = kept

    def _new_seq(
        self, req: GenRequest, sink: Sink, t: float, slot: int, reuse: int = 0, state: Any = None
    ) -> _Seq:
        spec = parse_method(req.method or self.method)
        params = req.params
        rule = get_rule("greedy" if params.greedy else (req.rule or self.rule))
        drafter = None if entry_of(spec).plain else lookup_drafter(spec.kind)
        if drafter is not None:
            drafter.reset()
        stats = SpecStats(prompt_tokens=len(req.prompt_ids))
        ctx = StepContext(self.batch, drafter, rule, params, Streams(req.seed, self.batch.device), stats)
        out = Output(
            eos_token_id=self.eos, stop_strings=req.stop, tokenizer=self.tokenizer if req.stop else None
        )
        budget = min(req.max_tokens, self.batch.max_length - len(req.prompt_ids))
        gamma = self.gamma if req.gamma is None else req.gamma
        s = _Seq(req, sink, slot, ctx, out, budget, gamma, t, prefilled=reuse)
        if drafter is not None and not gamma:
            s.local = SequenceAcceptance(self._acceptance(s))
        # the committed tokens live in one buffer (prompt + budget); the context is a view of it
        s.buf = torch.empty((1, len(req.prompt_ids) + budget), dtype=torch.long)
        s.buf[0, : len(req.prompt_ids)] = torch.tensor(req.prompt_ids, dtype=torch.long)
        s.context = s.buf[:, : len(req.prompt_ids)]
        self._spill(slot, 0 if state is not None else reuse)
        if state is not None:
            self.batch.restore(slot, state, reuse)
        elif reuse:
            self.batch.truncate(slot, reuse)
        else:
            self.batch.free(slot)
        stats.cached_prompt_tokens = reuse
        return s

    def _finish(self, s: _Seq, reason: str, error: str | None = None) -> None:
        held = self._held(s) if reason != "error" else []  # after a failed forward: forget it
        if held:
            self.batch.truncate(s.slot, len(held))
        else:
            self.batch.free(s.slot)
        with self._lock:
            self._active.remove(s)
            self._free.append(s.slot)
            self._cached[s.slot] = held
        st = s.ctx.stats
        st.num_generated_tokens = len(s.output.tokens)
        if s.t_start is not None:
            st.time_decode = time.perf_counter() - s.t_start
        ttft = None if s.t_first is None else s.t_first - s.t_submit
        s.sink(DoneEvent(s.req.request_id, list(s.output.tokens), reason, st, error, ttft))

    def _held(self, s: _Seq) -> list[int]:
        """The tokens whose cells ``s`` keeps for a later prompt: its prompt prefilled so far, or,
        decoding, its context but the last token (committed, not yet forwarded)."""
        if not s.decoding:
            return list(s.req.prompt_ids[: s.prefilled])
        n = min(s.context.shape[1] - 1, self.batch.length(s.slot))
        return s.context[0, :n].tolist()

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        by_slot = sorted(self._active, key=lambda s: s.slot)  # rows in seq_id order (llama.cpp's split)
        decoding = [s for s in by_slot if s.decoding]
        prefilling = [s for s in by_slot if not s.decoding]
        t0 = time.perf_counter()
        auto = any(s.local is not None for s in decoding)  # someone the scheduler drafts for
        draft = auto and self.guard.allow(len(decoding))
        for s in decoding:
            if s.t_start is None:
                s.t_start = t0
            if draft or s.local is None:
                self._propose(s)
            else:  # held back (`DraftGuard`): not even asked
                s.draft, s.conf = Draft.empty(1, self.batch.device), []
        t1 = time.perf_counter()
        ks = self._lengths(decoding, prefill_rows=0)
        parts: list[Part] = []
        for s, k in zip(decoding, ks, strict=True):
            s.draft = s.draft.prefix(k)
            parts.append(Part(s.slot, [int(s.context[0, -1]), *s.draft.tokens[0].tolist()], True))
        rows = sum(len(p.tokens) for p in parts)
        self.decode_rows += rows
        room = self.batch.max_rows - rows
        chunk = room if not decoding else min(room, self.prefill_chunk)
        fills: list[tuple[_Seq, int]] = []
        for s in prefilling:
            want = len(s.req.prompt_ids) - 1 - s.prefilled
            n = min(want, chunk)
            if n <= 0:
                break
            parts.append(Part(s.slot, s.req.prompt_ids[s.prefilled : s.prefilled + n], False))
            fills.append((s, n))
            chunk -= n
        rows = sum(len(p.tokens) for p in parts)
        parts.sort(key=lambda p: p.seq)
        logits_by_seq = dict(zip((p.seq for p in parts), self.batch.decode(parts), strict=True))
        logits = [logits_by_seq[s.slot] for s in decoding]
        dt = time.perf_counter() - t1
        forwards = self._forwards(parts)
        if len(forwards) == 1:  # c(R) is the cost of one forward of R rows (over n sequences)
            self.curve(len(parts)).observe(rows, dt)
        self.forwards += len(forwards)
        self.steps += 1
        self.rows_hist[rows] += 1
        for s, n in fills:
            s.prefilled += n
            s.ctx.stats.time_prefill += dt
        done: list[tuple[_Seq, str]] = []
        before = sum(len(s.output.tokens) for s in decoding) if auto else 0
        for s, lg in zip(decoding, logits, strict=False):
            s.ctx.stats.time_target_forward += dt
            s.ctx.stats.time_draft += (t1 - t0) / max(len(decoding), 1)
            reason = self._verify_commit(s, lg)
            if reason is not None:
                done.append((s, reason))
        if auto and not fills:
            committed = sum(len(s.output.tokens) for s in decoding) - before
            self.guard.observe(len(decoding), draft, committed, time.perf_counter() - t0)
        for s, reason in done:
            self._finish(s, reason)

    def _forwards(self, parts: list[Part]) -> list[int]:
        """Rows of each forward llama.cpp runs for ``parts`` (one, unless its split applies)."""
        if not self.split:
            return [sum(len(p.tokens) for p in parts)]
        rows = [0] * self.max_batch
        for p in parts:
            rows[p.seq] = len(p.tokens)
        return ubatch_rows(rows)

    def curve(self, n_seqs: int) -> OnlineCostCurve:
        """c(R) of forwards over ``n_seqs`` sequences (their attention runs per sequence: more
        sequences, more cost for the same rows), learned online from the one-sequence curve."""
        n = max(1, int(n_seqs))
        c = self._costs_by_seqs.get(n)
        if c is None:
            c = OnlineCostCurve(self.costs, self.costs.t_max, trusted=False)
            self._costs_by_seqs[n] = c
        return c

    def _cost(self, rows: int, n_seqs: int) -> float:
        return self.curve(n_seqs)(rows)

    def _propose(self, s: _Seq) -> None:
        room = s.budget - len(s.output.tokens)
        k_cap = min(self.k_max if s.fixed_gamma == 0 else s.fixed_gamma, room - 1)
        k_cap = min(k_cap, self.batch.max_length - s.context.shape[1])
        s.draft = propose(s.ctx, s.context, max(k_cap, 0))
        n = s.draft.num_tokens
        conf = s.draft.confidence
        acc = self._acceptance(s)
        raw = [acc.rate] * n if conf is None else conf[:n].clamp(0.0, 1.0).tolist()
        s.conf = raw

    def _acceptance(self, s: _Seq) -> AcceptanceModel:
        kind = type(s.ctx.drafter).__name__
        return self.acceptance.setdefault(kind, AcceptanceModel())

    def _lengths(self, decoding: list[_Seq], prefill_rows: int) -> list[int]:
        """k_i: fixed-gamma requests keep min(gamma, draft); the others share the scheduler's
        allocation over the batch cost curve."""
        ks = [s.draft.num_tokens if s.fixed_gamma else 0 for s in decoding]
        self.draft_rows += sum(ks)
        auto = [i for i, s in enumerate(decoding) if not s.fixed_gamma and s.draft.num_tokens]
        if not auto:
            return ks
        base = prefill_rows + len(decoding) + sum(ks)
        gains = [gains_from([decoding[i].local.estimate(c) for c in decoding[i].conf]) for i in auto]
        layout = None
        if self.split:
            chosen = set(auto)
            others = {
                s.slot: 1 + k for i, (s, k) in enumerate(zip(decoding, ks, strict=True)) if i not in chosen
            }
            layout = Layout([decoding[i].slot for i in auto], others)
        # a lookup draft's cost is paid when it is proposed, whatever is kept: no d here
        n = len(decoding)
        alloc = allocate(
            gains, base, lambda r: self._cost(r, n), 0.0, self.batch.max_rows, layout, self._cost
        )
        for i, k in zip(auto, alloc, strict=True):
            ks[i] = k
            self.draft_rows += k
        return ks

    def _verify_commit(self, s: _Seq, logits: torch.Tensor | None) -> str | None:
        """Verify, roll back, commit; the finish reason if the request is done."""
        draft = s.draft
        tau, tokens, _ = verify_rows(s.ctx, s.context, draft, logits[None])
        L = s.context.shape[1]
        self.batch.truncate(s.slot, L + tau)
        if draft.num_tokens and s.local is not None:
            s.local.update(s.conf[: draft.num_tokens], tau)  # first: it reads the shared estimates
            s.local.shared.update(s.conf[: draft.num_tokens], tau)
        room = s.budget - len(s.output.tokens)
        step = s.output.commit(tokens[:room])
        if step:
            if s.t_first is None:
                s.t_first = time.perf_counter()
            s.buf.numpy()[0, L : L + len(step)] = step
            s.context = s.buf[:, : L + len(step)]
            s.sink(TokenEvent(s.req.request_id, step))
        if s.output.done:
            return s.output.finish
        if len(s.output.tokens) >= s.budget:
            return "length"
        return None
