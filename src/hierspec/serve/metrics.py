"""Prometheus metrics of one app (its own `CollectorRegistry`), with vLLM's names where vLLM has
the metric, so its dashboards work:

    vllm:spec_decode_num_drafts_total                      spec steps (target forwards that verified a draft)
    vllm:spec_decode_num_draft_tokens_total                drafted tokens
    vllm:spec_decode_num_accepted_tokens_total             accepted draft tokens
    vllm:spec_decode_num_accepted_tokens_per_pos_total     ... by draft position (label position)
    vllm:request_success_total                             finished requests (label finished_reason)
    vllm:prompt_tokens_total, vllm:generation_tokens_total
    vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total   prompt tokens looked up in the
                                                          cells of finished sequences / found there
    vllm:num_requests_running, vllm:num_requests_waiting  from the worker's status()
    vllm:time_to_first_token_seconds                      request received -> first token sent
    vllm:inter_token_latency_seconds                      per token: the gap between two token
                                                          events / the tokens the later one carried
    hierspec_requests_total                               every ending (label finish_reason: stop,
                                                          length, cancelled, error, rejected)

Every metric carries the label ``model_name`` (as vLLM's do). prometheus_client's ``*_created``
series are switched off (process-wide, as vLLM does): they only double the output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from ..stats import SpecStats

__all__ = ["CONTENT_TYPE", "ServeMetrics", "spec_decode_summary"]

disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """The app's metrics (see module docstring); ``status`` is the worker's ``status``."""

    def __init__(self, model_name: str, status: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self._status = status
        m, r = ["model_name"], self.registry
        self.drafts = Counter("vllm:spec_decode_num_drafts", "Speculative steps.", m, registry=r)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens.", m, registry=r)
        self.accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Accepted draft tokens.", m, registry=r
        )
        self.accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by draft position.",
            [*m, "position"],
            registry=r,
        )
        self.success = Counter(
            "vllm:request_success", "Finished requests.", [*m, "finished_reason"], registry=r
        )
        self.requests = Counter(
            "hierspec_requests", "Requests by how they ended.", [*m, "finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", m, registry=r)
        self.cache_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m, registry=r
        )
        self.cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", m, registry=r
        )
        self.running = Gauge("vllm:num_requests_running", "Requests decoding now.", m, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests in the queue.", m, registry=r)
        self.running.labels(model_name).set_function(lambda: self._read("running"))
        self.waiting.labels(model_name).set_function(lambda: self._read("queued"))
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Request received -> first token.",
            m,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time per generated token after the first.",
            m,
            buckets=ITL_BUCKETS,
            registry=r,
        )

    def _read(self, key: str) -> float:
        try:
            return float(self._status().get(key, 0))
        except Exception:  # a metrics scrape never fails because of the worker
            return float("nan")

    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def tokens_after(self, seconds: float, n: int) -> None:
        """``n`` tokens arrived ``seconds`` after the previous ones."""
        child = self.itl.labels(self.model_name)
        for _ in range(n):
            child.observe(seconds / n)

    def finished(
        self, finish_reason: str, prompt_tokens: int, generated: int, stats: SpecStats | None
    ) -> None:
        """One request ended (``finish_reason``: stop | length | cancelled | error | rejected)."""
        name = self.model_name
        self.requests.labels(name, finish_reason).inc()
        if finish_reason in ("stop", "length"):
            self.success.labels(name, finish_reason).inc()
        if finish_reason == "rejected":
            return
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generation_tokens.labels(name).inc(generated)
        if stats is None:
            return
        self.cache_queries.labels(name).inc(prompt_tokens)
        self.cache_hits.labels(name).inc(stats.cached_prompt_tokens)
        self.drafts.labels(name).inc(stats.num_spec_steps)
        self.draft_tokens.labels(name).inc(stats.num_draft_tokens)
        self.accepted_tokens.labels(name).inc(stats.num_accepted_draft_tokens)
        for pos, n in enumerate(stats.accepted_per_position):
            self.accepted_per_pos.labels(name, str(pos)).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def spec_decode_summary(stats: SpecStats) -> dict[str, Any]:
    """vLLM's per-request speculative-decoding summary of ``stats`` (an extra response field)."""
    return {
        "num_drafts": stats.num_spec_steps,
        "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_draft_tokens,
        "accepted_per_position": list(stats.accepted_per_position),
        "mean_acceptance_length": stats.mean_acceptance_length,
        "draft_acceptance_rate": stats.draft_acceptance_rate,
    }
