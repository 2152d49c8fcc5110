"""The continuous-batching worker (`hierspec.serve.batch`): exact per request (chi² of the first
tokens of many concurrent sampled requests, with negative controls), greedy identity and seeded
reproducibility on llama.cpp whatever else is in the batch, cancellation, a full queue."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hierspec.models import make_tiny_pair
from hierspec.models.sequences import ModelSequences
from hierspec.rng import Streams
from hierspec.sampling import SamplingParams
from hierspec.serve.batch import BatchWorker
from hierspec.serve.worker import DoneEvent, GenRequest, QueueFull, TokenEvent

V = 12
PROMPT = [1, 5, 7, 5, 7, 5, 7, 5]  # repeats: the n-gram drafter drafts
T1 = SamplingParams(temperature=1.0)


class Collector:
    """A sink that records events and signals when ``n`` requests are done."""

    def __init__(self, n: int) -> None:
        self.n, self.done, self.tokens = n, {}, {}
        self.event = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, e) -> None:
        with self.lock:
            if isinstance(e, TokenEvent):
                self.tokens.setdefault(e.request_id, []).extend(e.token_ids)
            elif isinstance(e, DoneEvent):
                self.done[e.request_id] = e
                if len(self.done) >= self.n:
                    self.event.set()

    def wait(self, timeout: float = 120.0) -> dict[str, DoneEvent]:
        assert self.event.wait(timeout), f"only {len(self.done)} of {self.n} requests finished"
        return self.done


@pytest.fixture(scope="module")
def tiny():
    target, _ = make_tiny_pair(vocab_size=V, seed=6, dtype=torch.float64, max_length=64)
    return target


def worker_on(target, **kw) -> BatchWorker:
    seqs = ModelSequences(lambda: copy.deepcopy(target), num_seqs=kw.pop("num_seqs", 4))
    kw.setdefault("max_queue", 10_000)
    w = BatchWorker(seqs, None, cost_prior=lambda r: 1.0 + 0.05 * r, eos_token_id=None, **kw)
    w.start()
    return w


def exact_two_tokens(target) -> np.ndarray:
    """P(y1, y2 | PROMPT) of the processed target at T = 1, from full-prefix forwards."""
    law = np.zeros((V, V))
    target.reset()
    p1 = torch.softmax(target.forward(torch.tensor([PROMPT])).logits[0, -1], -1)
    for a in range(V):
        target.reset()
        p2 = torch.softmax(target.forward(torch.tensor([[*PROMPT, a]])).logits[0, -1], -1)
        law[a] = (p1[a] * p2).numpy()
    target.reset()
    return law


def sample_pairs(target, n: int, seeds, gamma: int | None = 1, **kw) -> np.ndarray:
    """First two tokens of ``n`` concurrent requests (gamma 1: every step drafts; None: the
    scheduler chooses)."""
    w = worker_on(target, **kw)
    sink = Collector(n)
    try:
        for i in range(n):
            w.submit(GenRequest(str(i), list(PROMPT), T1, 2, seed=seeds(i), gamma=gamma), sink)
        done = sink.wait()
    finally:
        w.shutdown()
    counts = np.zeros((V, V))
    for e in done.values():
        assert e.finish_reason == "length", e.error
        counts[e.token_ids[0], e.token_ids[1]] += 1
    assert w.draft_rows > 0  # speculation ran
    return counts


def chi2_p(counts: np.ndarray, law: np.ndarray) -> float:
    exp = law.flatten() * counts.sum()
    keep = exp > 0
    return float(chisquare(counts.flatten()[keep], exp[keep] * counts.sum() / exp[keep].sum()).pvalue)


N = 1500


@pytest.mark.parametrize("rule,gamma", [("block", 1), ("token", 1), ("block", None)])
def test_concurrent_sampled_requests_are_exact(tiny, rule, gamma):
    law = exact_two_tokens(tiny)
    counts = sample_pairs(tiny, N, lambda i: 1000 + i, gamma, rule=rule)
    assert chi2_p(counts, law) > 1e-3


def test_shared_random_stream_fails(tiny):
    """Negative control: requests that share one seed (one stream) are not independent draws."""
    law = exact_two_tokens(tiny)
    counts = sample_pairs(tiny, 300, lambda i: 5)
    assert chi2_p(counts, law) < 1e-6


def test_wrong_rollback_fails(tiny, monkeypatch):
    """Negative control: keeping the first rejected draft row in a sequence's cache biases the
    next token, and the chi² test sees it."""
    real = ModelSequences.truncate

    def keep_one_more(self, seq, n):
        real(self, seq, min(n + 1, self.length(seq)))

    monkeypatch.setattr(ModelSequences, "truncate", keep_one_more)
    law = exact_two_tokens(tiny)
    counts = sample_pairs(tiny, N, lambda i: 1000 + i)
    assert chi2_p(counts, law) < 1e-6


def test_seeded_request_text_does_not_depend_on_the_batch(tiny):
    """The same seeded request alone, or among others that change the scheduler's lengths,
    gives the same text -- the text of plain sampling with that seed."""
    from hierspec.engine import generate

    ref = generate(tiny, PROMPT, params=T1, max_new_tokens=20, seed=42).token_ids
    for crowd in (0, 3, 7):
        w = worker_on(tiny)
        sink = Collector(crowd + 1)
        try:
            w.submit(GenRequest("me", list(PROMPT), T1, 20, seed=42), sink)
            for i in range(crowd):
                w.submit(GenRequest(f"o{i}", [2, 3, 2, 3, 2, 3], T1, 20, seed=i), sink)
            done = sink.wait()
        finally:
            w.shutdown()
        assert done["me"].token_ids == ref, crowd
        assert sink.tokens["me"] == ref  # the streamed tokens are the final ones


def test_cancel_frees_the_sequence(tiny):
    w = worker_on(tiny, num_seqs=2)
    sink = Collector(3)
    try:
        w.submit(GenRequest("long", list(PROMPT), T1, 60, seed=1), sink)
        w.cancel("long")
        w.submit(GenRequest("a", list(PROMPT), T1, 5, seed=2), sink)
        w.submit(GenRequest("b", list(PROMPT), T1, 5, seed=3), sink)
        done = sink.wait()
    finally:
        w.shutdown()
    assert done["long"].finish_reason in ("cancelled", "length")
    assert done["a"].finish_reason == done["b"].finish_reason == "length"
    assert w.status()["running"] == 0 and sorted(w._free) == [0, 1]


def test_queue_full_refuses_at_once(tiny):
    seqs = ModelSequences(lambda: copy.deepcopy(tiny), num_seqs=1)
    w = BatchWorker(seqs, None, cost_prior=lambda r: 1.0, max_queue=2)  # not started: nothing drains
    w.submit(GenRequest("1", list(PROMPT), T1, 5), lambda e: None)
    w.submit(GenRequest("2", list(PROMPT), T1, 5), lambda e: None)
    with pytest.raises(QueueFull):
        w.submit(GenRequest("3", list(PROMPT), T1, 5), lambda e: None)


def test_unbatchable_method_is_refused(tiny):
    seqs = ModelSequences(lambda: copy.deepcopy(tiny), num_seqs=1)
    w = BatchWorker(seqs, None, cost_prior=lambda r: 1.0)
    with pytest.raises(ValueError, match="method"):
        w.submit(GenRequest("1", list(PROMPT), T1, 5, method="draft:small"), lambda e: None)


def test_streams_differ_by_seed():
    a, b = Streams(1), Streams(2)
    assert a.uniforms(5, 3).tolist() != b.uniforms(5, 3).tolist()


# ------------------------------------------------------------------------- llama.cpp
@pytest.mark.smollm
def test_llamacpp_batch_greedy_identity_and_seeds():
    """Four concurrent requests in one llama.cpp context: greedy texts equal single-sequence
    `generate`'s, and a seeded sampled request equals plain sampling with that seed."""
    from hierspec.engine import generate
    from hierspec.models.llamacpp import LlamaCppModel
    from hierspec.models.llamacpp_batch import SequenceBatch
    from hierspec.models.open import open_target

    op = open_target("smollm2-135m", backend="llama.cpp", n_ctx=512)
    tok = op.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
        for t in ("Write a Python function that adds two numbers.", "Name three colours.",
                  "Say hello in French.", "Count from one to ten in words.")
    ]  # fmt: skip
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    greedy, warm = SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.95)
    refs = [generate(op.model, p, params=greedy, max_new_tokens=40).token_ids for p in prompts]
    seeded = generate(op.model, prompts[0], params=warm, max_new_tokens=40, seed=9).token_ids
    op.model.close()
    model = LlamaCppModel(op.path, n_seq_max=4, n_ctx=512)
    w = BatchWorker(SequenceBatch(model), tok, cost_prior=lambda r: 0.01 + 0.004 * r, eos_token_id=None)
    w.start()
    sink = Collector(5)
    try:
        for i, p in enumerate(prompts):
            w.submit(GenRequest(str(i), p, greedy, 40), sink)
        w.submit(GenRequest("s", prompts[0], warm, 40, seed=9), sink)
        done = sink.wait(300)
    finally:
        w.shutdown()
        model.close()
    same = [done[str(i)].token_ids == refs[i] for i in range(4)]
    assert all(same), same
    assert done["s"].token_ids == seeded
