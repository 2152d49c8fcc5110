"""One submitted request, on the app's side: its event queue (filled from the worker's thread),
its text (`hierspec.serve.text.TextStream`), its timings for the metrics, and its ending:
finished, failed (500 / 503) or abandoned by its client (cancelled in the worker at once).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request

from .errors import ApiError
from .metrics import ServeMetrics
from .text import TextStream
from .worker import DoneEvent, Event, GenRequest, TokenEvent, Worker

__all__ = ["FINISH", "Call"]

#: hierspec's finish reasons -> OpenAI's
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class Call:
    """See module docstring; ``poll_s``: how often a waiting call checks its client is there."""

    def __init__(
        self, worker: Worker, metrics: ServeMetrics, tokenizer: Any, gen: GenRequest, poll_s: float
    ) -> None:
        self.worker, self.metrics, self.gen, self.poll_s = worker, metrics, gen, poll_s
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.text = TextStream(tokenizer, gen.stop)
        self.t0 = time.perf_counter()
        self.last: float | None = None
        self.done: DoneEvent | None = None
        self.abandoned = False
        self.checked = time.monotonic()  # when the client was last seen connected
        self.created = int(time.time())

    def sink(self, event: Event) -> None:  # the worker's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def next(self, request: Request | None) -> Event | None:
        """The next event; None when the client went away first (``request``: checked every
        ``poll_s``, also while events keep coming)."""
        if request is None:
            return await self.events.get()
        poll = self.poll_s
        while True:
            now = time.monotonic()
            if now - self.checked >= poll:
                self.checked = now
                if await request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.events.get(), poll)
            except asyncio.TimeoutError:
                continue

    def on_tokens(self, event: TokenEvent) -> str:
        """Timings and the newly final text of a token event."""
        now = time.perf_counter()
        if self.last is None:
            self.metrics.first_token(now - self.t0)
        elif event.token_ids:
            self.metrics.tokens_after(now - self.last, len(event.token_ids))
        self.last = now
        return self.text.push(event.token_ids)

    def on_done(self, event: DoneEvent) -> str:
        """Metrics and the rest of the text of the last event."""
        self.done = event
        reason = FINISH.get(event.finish_reason, event.finish_reason)
        self.metrics.finished(reason, len(self.gen.prompt_ids), len(event.token_ids), event.stats)
        return self.text.finish(event.token_ids)

    def abandon(self) -> None:
        """The client went away: free the sequence now."""
        if self.done is None and not self.abandoned:
            self.abandoned = True
            self.worker.cancel(self.gen.request_id)
            self.metrics.finished("cancelled", len(self.gen.prompt_ids), len(self.text.token_ids), None)

    def finish_reason(self) -> str:
        assert self.done is not None
        if self.text.stopped:  # a stop string cut the text
            return "stop"
        return FINISH.get(self.done.finish_reason, "stop")

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage; ``prompt_tokens_details.cached_tokens`` when the worker reused cells."""
        n, m = len(self.gen.prompt_ids), len(self.done.token_ids) if self.done else 0
        out: dict[str, Any] = {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}
        cached = getattr(self.done.stats, "cached_prompt_tokens", 0) if self.done else 0
        if cached:
            out["prompt_tokens_details"] = {"cached_tokens": cached}
        return out

    def failure(self) -> ApiError | None:
        """The error of a request that ended without finishing, or None."""
        d = self.done
        if d is None or d.finish_reason not in ("error", "cancelled"):
            return None
        if d.finish_reason == "cancelled":
            return ApiError(503, "the request was cancelled (the server is shutting down)", None, "cancelled")
        return ApiError(500, f"generation failed: {d.error or 'unknown error'}", None, "generation_error")
