"""The contract between the HTTP layer (`hierspec.serve.app`) and what decodes (a worker).

    app  --submit(GenRequest, sink)-->  worker           (thread-safe; QueueFull at once if full)
    worker --sink(TokenEvent)-->  app                    committed tokens of one step, in order
    worker --sink(DoneEvent)-->   app                    exactly once per accepted request, last
    app  --cancel(request_id)-->  worker                 a client went away: free its sequence now

A worker owns the models and runs in its own thread(s); ``sink`` is called from that thread and
must not block (the app hands events to its event loop with ``loop.call_soon_threadsafe``).
Tokens in events are already cut at EOS / stop strings (`hierspec.output.Output`): the app only
detokenises and frames them. Two workers implement it: `hierspec.serve.serial.SerialWorker` (one
request at a time through `hierspec.engine.generate`, any backend) and
`hierspec.serve.batch.BatchWorker` (continuous batching on llama.cpp).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..sampling import SamplingParams
from ..stats import SpecStats


class QueueFull(Exception):
    """The worker's queue is full: the request is refused at once (HTTP 429)."""


@dataclass
class GenRequest:
    """One validated generation request (the app has checked every field against the model).

    method / gamma / rule: None = the server's defaults (``hierspec serve --method/--gamma/--rule``).
    gamma 0 = auto (adaptive), as `hierspec.methods.spec.parse_gamma` returns it.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    method: str | None = None
    gamma: int | None = None
    rule: str | None = None


@dataclass
class TokenEvent:
    request_id: str
    token_ids: list[int]


@dataclass
class DoneEvent:
    """The end of a request: finish_reason "length" | "eos" | "stop" | "cancelled" | "error".

    token_ids: every token committed for the request (what its TokenEvents carried, in order)."""

    request_id: str
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats
    error: str | None = None
    #: seconds from submit to the first committed token (None: no token)
    time_to_first_token: float | None = None


Event = TokenEvent | DoneEvent
Sink = Callable[[Event], None]


class Worker(Protocol):
    """What the app needs from a worker (see module docstring)."""

    max_queue: int

    def start(self) -> None: ...

    def submit(self, request: GenRequest, sink: Sink) -> None:
        """Queue ``request``; raises QueueFull if ``max_queue`` requests are already waiting."""
        ...

    def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` (queued or running) and free its state; its DoneEvent says
        "cancelled". Unknown or finished ids are ignored."""
        ...

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, finish (or, after ``timeout_s``, cancel) those in flight, join."""
        ...

    def status(self) -> dict[str, Any]:
        """``{"queued": int, "running": int, ...}`` for /health and /metrics."""
        ...
