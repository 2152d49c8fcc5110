"""Which worker serves: continuous batching on llama.cpp where it can, else one at a time.

    backend llama.cpp and a method the batch worker runs (ar, ngram, suffix)  ->  BatchWorker
    otherwise (torch backend, a method with a draft model, ...)              ->  SerialWorker

``worker="serial"`` takes the serial worker anyway (one request at a time, as llama-cpp-python's
server; starts without measuring a batch cost curve); ``worker="batch"`` insists on batching
(ValueError naming ``--worker`` when it cannot).

The batching worker needs a llama.cpp context with one sequence per batch slot: the target is
reopened from its GGUF file with ``n_seq_max = max_batch`` (same context length and threads)
unless it already has that many, and handed to ``BatchWorker.from_llamacpp``. `Chosen.why` says
why the other worker was not chosen (the startup line prints it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..methods import ModelSet
from .batch import BatchWorker
from .serial import SerialWorker
from .worker import Worker

__all__ = ["WORKERS", "Chosen", "make_worker"]

WORKERS = ("auto", "serial", "batch")


@dataclass
class Chosen:
    """The worker, its class name and why it was chosen."""

    worker: Worker
    name: str
    why: str


def _batched_target(target: Any, max_batch: int, threads: int | None) -> Any:
    """``target`` with ``max_batch`` sequences: itself, or its GGUF reopened with them."""
    if getattr(target, "n_seq_max", 1) == max_batch:
        return target
    return type(target)(
        target.path,
        n_ctx=int(target.max_length),
        n_threads=threads or getattr(target, "n_threads", None),
        n_seq_max=max_batch,
    )


def make_worker(
    models: ModelSet,
    *,
    method: str = "ngram",
    gamma: int = 0,
    rule: str = "block",
    draft_sampling: str = "sample",
    prefix_cache: bool = True,
    cache_bytes: int = 1 << 30,
    max_batch: int = 8,
    max_queue: int = 64,
    threads: int | None = None,
    worker: str = "auto",
) -> Chosen:
    """The worker for ``models`` (see module docstring); not started yet."""
    if worker not in WORKERS:
        raise ValueError(f"--worker: expected one of {', '.join(WORKERS)}, got {worker!r}")
    why = f"the {models.backend} backend decodes one request at a time"
    if worker == "serial":
        why = "--worker serial: one request at a time"
    elif models.backend == "llama.cpp":
        try:
            BatchWorker.check_method(method)
        except ValueError as err:
            why = f"one request at a time: {err}"
        else:
            target = _batched_target(models.target, max_batch, threads)
            if target is not models.target:
                models.target.close()  # the one-sequence context is not used: free its memory
            batched = BatchWorker.from_llamacpp(
                target,
                models.tokenizer,
                method=method,
                gamma=gamma,
                rule=rule,
                max_queue=max_queue,
                eos_token_id=getattr(models.tokenizer, "eos_token_id", None),
                prefix_cache=prefix_cache,
                cache_bytes=cache_bytes,
            )
            return Chosen(batched, type(batched).__name__, f"continuous batching of up to {max_batch}")
    if worker == "batch":
        raise ValueError(f"--worker batch: not available ({why})")
    serial = SerialWorker(
        models, method=method, gamma=gamma, rule=rule, draft_sampling=draft_sampling, max_queue=max_queue
    )
    return Chosen(serial, type(serial).__name__, why)
