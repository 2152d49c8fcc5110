"""`BatchWorker`: continuous batching with exact speculation per request, on llama.cpp.

One llama.cpp context holds up to ``max_batch`` sequences (a seq_id per request,
`hierspec.models.llamacpp_batch.SequenceBatch`). Each scheduler step:

    admit     queued requests take free seq_ids; cancelled ones free theirs at once
    propose   every decoding sequence's drafter proposes up to k_max tokens (`hierspec.step.propose`)
    allocate  the scheduler keeps k_i of them (`hierspec.serve.scheduler.allocate`: expected
              tokens per second of the whole batch from the batched cost curve c(R))
    forward   ONE llama_decode: per decoding sequence [x_L, X_1..X_k_i] (logits on), plus chunks
              of the prompts being prefilled (logits off), so new requests never stall the others
    verify    per sequence, its own rule and streams (`hierspec.step.verify_rows`): ragged tau_i
    commit    EOS / stop strings (`hierspec.output.Output`), events to the app, and each sequence
              rolled back on its own: llama_memory_seq_rm(seq_i, L_i + tau_i, -1)

Exactness per request: a sequence's rows, rule and random streams are its own (seeded by the
request's seed and keyed by position, `hierspec.rng`), so each response is distributed exactly as
the target's law for that request alone; with a deterministic draft (n-gram, suffix, or none) a
seeded response is the text plain sampling gives with that seed, whatever else is in the batch
and whatever lengths the scheduler chose -- as far as llama.cpp's rows for a sequence do not
depend on the other rows of the batch (measured: README, "Serving").

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

from ..curve import OnlineCostCurve
from ..drafters.base import Draft
from ..methods import ENTRIES, entry_of, lookup_drafter, parse_method
from ..models.llamacpp_batch import SequenceBatch
from ..models.sequences import Part, Sequences
from ..output import Output
from ..policy import AcceptanceModel
from ..rng import Streams
from ..stats import SpecStats
from ..step import StepContext, propose, verify_rows
from ..verify import get_rule
from .scheduler import allocate, gains_from
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
    draft: Draft | None = None
    conf: list[float] = field(default_factory=list)
    t_first: float | None = None
    t_start: float | None = None

    @property
    def decoding(self) -> bool:
        return self.prefilled >= len(self.req.prompt_ids) - 1


class BatchWorker:
    """Continuous batching over ``seqs`` (`hierspec.models.sequences.Sequences`: a llama.cpp
    context with several sequences, `SequenceBatch`; see module docstring) and the cost prior
    c(R) of its forwards (`from_llamacpp` measures it). ``method`` / ``gamma`` / ``rule``:
    defaults for requests that do not set them (gamma 0 = auto). ``prefill_chunk``: most prompt
    rows per step while other sequences decode."""

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
        self.acceptance: dict[str, AcceptanceModel] = {}
        self._queue: collections.deque[tuple[GenRequest, Sink, float]] = collections.deque()
        self._active: list[_Seq] = []
        self._free = list(range(self.max_batch))
        self._cancel: set[str] = set()
        self._lock = threading.Condition()
        self._stopping = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.rows_hist: collections.Counter[int] = collections.Counter()
        self.draft_rows = 0  # drafted rows the scheduler kept, all steps
        self.decode_rows = 0  # rows of decoding sequences (1 + k_i each), all steps

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
            "draft_rows": self.draft_rows,
            "decode_rows": self.decode_rows,
            "cost_curve_ms": {r: round(1e3 * self.costs(r), 2) for r in CURVE_SIZES},
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
                self._active.append(self._new_seq(req, sink, t, self._free.pop(0)))
            elif self._stopping:
                sink(DoneEvent(req.request_id, [], "cancelled", SpecStats()))
            else:
                kept.append((req, sink, t))
        self._queue = kept

    def _new_seq(self, req: GenRequest, sink: Sink, t: float, slot: int) -> _Seq:
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
        s = _Seq(req, sink, slot, ctx, out, budget, gamma, t)
        s.context = torch.tensor([req.prompt_ids], dtype=torch.long)
        self.batch.free(slot)
        return s

    def _finish(self, s: _Seq, reason: str, error: str | None = None) -> None:
        self.batch.free(s.slot)
        with self._lock:
            self._active.remove(s)
            self._free.append(s.slot)
        st = s.ctx.stats
        st.num_generated_tokens = len(s.output.tokens)
        if s.t_start is not None:
            st.time_decode = time.perf_counter() - s.t_start
        ttft = None if s.t_first is None else s.t_first - s.t_submit
        s.sink(DoneEvent(s.req.request_id, list(s.output.tokens), reason, st, error, ttft))

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        decoding = [s for s in self._active if s.decoding]
        prefilling = [s for s in self._active if not s.decoding]
        t0 = time.perf_counter()
        for s in decoding:
            if s.t_start is None:
                s.t_start = t0
            self._propose(s)
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
        logits = self.batch.decode(parts)
        dt = time.perf_counter() - t1
        self.costs.observe(rows, dt)
        self.steps += 1
        self.rows_hist[rows] += 1
        for s, n in fills:
            s.prefilled += n
            s.ctx.stats.time_prefill += dt
        done: list[tuple[_Seq, str]] = []
        for s, lg in zip(decoding, logits, strict=False):
            s.ctx.stats.time_target_forward += dt
            s.ctx.stats.time_draft += (t1 - t0) / max(len(decoding), 1)
            reason = self._verify_commit(s, lg)
            if reason is not None:
                done.append((s, reason))
        for s, reason in done:
            self._finish(s, reason)

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
        gains = [gains_from([self._acceptance(decoding[i]).estimate(c) for c in decoding[i].conf])
                 for i in auto]  # fmt: skip
        # a lookup draft's cost is paid when it is proposed, whatever is kept: no d here
        alloc = allocate(gains, base, self.costs, 0.0, self.batch.max_rows)
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
        if draft.num_tokens and s.ctx.drafter is not None and not s.fixed_gamma:
            self._acceptance(s).update(s.conf[: draft.num_tokens], tau)
        room = s.budget - len(s.output.tokens)
        step = s.output.commit(tokens[:room])
        if step:
            if s.t_first is None:
                s.t_first = time.perf_counter()
            s.context = torch.cat([s.context, torch.tensor([step], dtype=torch.long)], 1)
            s.sink(TokenEvent(s.req.request_id, step))
        if s.output.done:
            return s.output.finish
        if len(s.output.tokens) >= s.budget:
            return "length"
        return None
