"""`SerialWorker`: one request at a time through the method registry, behind a bounded queue.

    submit -> queue (at most max_queue waiting; QueueFull at once beyond) -> one thread:
        built = build_method(method, models, rule=, gamma=)      cached per (method, rule, gamma)
        built.generate(prompt, ..., on_tokens=push TokenEvent)  -> DoneEvent

The torch backend's worker (any method the registry runs there) and the fallback where no
continuous-batching worker exists. Cancellation: ``on_tokens`` raises a private exception once
the request is cancelled (after the step in progress), the loop unwinds, the DoneEvent says
"cancelled"; a queued request is dropped at once. Any exception while decoding becomes a
DoneEvent "error" with a one-line message; the thread never dies of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..drafters.model import check_draft_sampling
from ..methods import Built, ModelSet, build_method, entry_of, parse_method
from ..stats import SpecStats
from .worker import DoneEvent, GenRequest, QueueFull, Sink, TokenEvent

__all__ = ["SerialWorker", "one_line"]

log = logging.getLogger("hierspec.serve")

_WARMUP_TEXT = "Hello, how are you?"


class _Cancelled(Exception):
    """Raised inside ``on_tokens`` to unwind a cancelled request's decode loop."""


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (an error event's text)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@dataclass
class _Job:
    request: GenRequest
    sink: Sink
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    first_token: float | None = None


class SerialWorker:
    """See module docstring. ``method`` / ``gamma`` (0 = auto) / ``rule``: the defaults of
    requests that leave them out; ``draft_sampling``: how methods with a draft model draft at
    T > 0 (others ignore it); ``max_queue``: requests waiting besides the running one."""

    max_batch = 1

    def __init__(
        self,
        models: ModelSet,
        *,
        method: str = "ngram",
        gamma: int = 0,
        rule: str = "block",
        draft_sampling: str = "sample",
        max_queue: int = 64,
        warmup: bool = True,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.models = models
        self.tokenizer = models.tokenizer
        self.method, self.gamma, self.rule = method, gamma, rule
        self.draft_sampling = check_draft_sampling(draft_sampling, "draft_sampling")
        self.max_queue = max_queue
        self.warmup = warmup
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self._cancelled: set[str] = set()
        self._built: dict[tuple[str, str, int], Built] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self.completed = 0

    # ------------------------------------------------------------------ the Worker protocol
    def start(self) -> None:
        """Build the default method (errors surface here, before serving), warm it up, start."""
        if self._thread is not None:
            return
        built = self._method(self.method, self.rule, self.gamma)
        if self.warmup:
            self._warm(built)
        self._thread = threading.Thread(target=self._loop, name="hierspec-serial-worker", daemon=True)
        self._thread.start()

    def submit(self, request: GenRequest, sink: Sink) -> None:
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._queue.append(_Job(request, sink))
            self._cond.notify_all()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            job = next((j for j in self._queue if j.request.request_id == request_id), None)
            if job is not None:
                self._queue.remove(job)
            elif self._running is not None and self._running.request.request_id == request_id:
                self._cancelled.add(request_id)
        if job is not None:
            self._emit(job, DoneEvent(request_id, [], "cancelled", self._stats(job)))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None:
            self._drop_queue()
            return
        thread.join(timeout_s)
        if thread.is_alive():  # past the grace time: cancel what is left
            self._drop_queue()
            with self._cond:
                if self._running is not None:
                    self._cancelled.add(self._running.request.request_id)
            thread.join(10.0)

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "worker": type(self).__name__,
                "queued": len(self._queue),
                "running": int(self._running is not None),
                "max_queue": self.max_queue,
                "max_batch": self.max_batch,
                "completed": self.completed,
                "alive": self._thread is not None and self._thread.is_alive(),
                "closing": self._closing,
                "methods": [f"{m} rule={r} gamma={g or 'auto'}" for m, r, g in self._built],
            }

    # ------------------------------------------------------------------ internals
    def _method(self, method: str, rule: str, gamma: int) -> Built:
        key = (method, rule, gamma)
        built = self._built.get(key)
        if built is None:
            sampling = self.draft_sampling if entry_of(parse_method(method)).draft_sampling else "sample"
            built = build_method(method, self.models, rule=rule, gamma=gamma, draft_sampling=sampling)
            self._built[key] = built
        return built

    def _warm(self, built: Built) -> None:
        """A few tokens on a short prompt: allocations and first-call costs, before serving."""
        tok = self.tokenizer
        ids = list(tok(_WARMUP_TEXT)["input_ids"])[:16] if tok is not None else [0, 1, 2]
        built.generate(ids or [0], max_new_tokens=4, seed=0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._running = self._queue.popleft()
            try:
                done = self._run(job)
            except BaseException as err:  # never dies: even a KeyboardInterrupt ends one request only
                done = DoneEvent(job.request.request_id, job.tokens, "error", self._stats(job), one_line(err))
            with self._cond:
                self._running = None
                self._cancelled.discard(job.request.request_id)
                self.completed += 1
            self._emit(job, done)

    def _run(self, job: _Job) -> DoneEvent:
        req = job.request
        rid = req.request_id

        def on_tokens(step: list[int]) -> None:
            if rid in self._cancelled:
                raise _Cancelled
            if job.first_token is None:
                job.first_token = time.perf_counter()
            job.tokens.extend(step)
            self._emit(job, TokenEvent(rid, list(step)))

        tok = self.tokenizer
        try:
            if rid in self._cancelled:
                raise _Cancelled
            built = self._method(
                req.method or self.method,
                req.rule or self.rule,
                self.gamma if req.gamma is None else req.gamma,
            )
            res = built.generate(
                req.prompt_ids,
                params=req.params,
                max_new_tokens=req.max_tokens,
                eos_token_id=getattr(tok, "eos_token_id", None),
                stop_strings=req.stop,
                tokenizer=tok,
                seed=req.seed,
                on_tokens=on_tokens,
            )
        except _Cancelled:
            return DoneEvent(rid, job.tokens, "cancelled", self._stats(job), None, self._ttft(job))
        except Exception as err:
            log.warning("request %s failed: %s", rid, one_line(err))
            return DoneEvent(rid, job.tokens, "error", self._stats(job), one_line(err), self._ttft(job))
        return DoneEvent(rid, list(res.token_ids), res.finish_reason, res.stats, None, self._ttft(job))

    def _ttft(self, job: _Job) -> float | None:
        return None if job.first_token is None else job.first_token - job.submitted

    @staticmethod
    def _stats(job: _Job) -> SpecStats:
        return SpecStats(num_generated_tokens=len(job.tokens), prompt_tokens=len(job.request.prompt_ids))

    def _drop_queue(self) -> None:
        with self._cond:
            jobs = list(self._queue)
            self._queue.clear()
        for job in jobs:
            self._emit(job, DoneEvent(job.request.request_id, [], "cancelled", self._stats(job)))

    @staticmethod
    def _emit(job: _Job, event: TokenEvent | DoneEvent) -> None:
        try:
            job.sink(event)
        except Exception as err:  # the app's side; never the worker's death
            log.warning("sink of request %s failed: %s", job.request.request_id, one_line(err))
