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


def _one(w: BatchWorker, rid: str, prompt: list[int], params=T1, n: int = 12, seed: int = 3) -> DoneEvent:
    sink = Collector(1)
    w.submit(GenRequest(rid, list(prompt), params, n, seed=seed), sink)
    return sink.wait()[rid]


@pytest.mark.parametrize("corrupt", [False, True])
def test_prefix_reuse_is_the_same_decoding(tiny, monkeypatch, corrupt):
    """A follow-up prompt (the last prompt + its answer + more) reuses the cells of the sequence
    that served it (``cached_prompt_tokens``) and gets the text of a fresh decoding, greedy and
    seeded; an unrelated prompt reuses nothing. Negative control: a prefix match that compares
    lengths, not tokens, reuses cells of other tokens, and the texts differ."""
    from hierspec.engine import generate

    if corrupt:
        monkeypatch.setattr("hierspec.serve.slots.common_prefix", lambda a, b: min(len(a), len(b)))
    greedy = SamplingParams(temperature=0)
    w = worker_on(tiny, num_seqs=2)
    got, refs = {}, {}
    try:
        first = _one(w, "a", PROMPT, greedy)
        follow = [*PROMPT, *first.token_ids, 3, 4]
        for name, prompt, params in (
            ("greedy", follow, greedy), ("seeded", follow, T1), ("other", [2, 3, 2, 3, 2, 3, 2, 3], greedy)
        ):  # fmt: skip
            got[name] = _one(w, name, prompt, params)
            refs[name] = generate(tiny, prompt, params=params, max_new_tokens=12, seed=3).token_ids
    finally:
        w.shutdown()
    texts = {name: e.token_ids for name, e in got.items()}
    if corrupt:
        assert texts != refs
        return
    assert texts == refs
    assert got["greedy"].stats.cached_prompt_tokens == len(PROMPT) + len(first.token_ids) - 1
    assert got["seeded"].stats.cached_prompt_tokens == len(follow) - 1  # the greedy follow-up's cells
    assert got["other"].stats.cached_prompt_tokens == 0


def test_prefix_reuse_from_host_copies(tiny):
    """With more prompts than seq_ids, overwritten cells go to the host store first and come back
    for a follow-up: the follow-up reuses them and gets the text of a fresh decoding."""
    from hierspec.engine import generate

    greedy = SamplingParams(temperature=0)
    w = worker_on(tiny, num_seqs=1)
    try:
        longer = [*PROMPT, 2, 3, 4, 6, 2, 3, 4, 6, 2, 3, 4, 6, 2, 3, 4, 6]  # >= MIN_CACHED positions
        first = _one(w, "a", longer, greedy, n=10)
        _one(w, "b", [9, 8, 7, 6, 9, 8], greedy)  # takes the only seq_id: a's cells go to the host
        assert w.status()["prefix_cache"]["host_copies"] == 1
        follow = [*longer, *first.token_ids, 5]
        got = _one(w, "c", follow, T1)
    finally:
        w.shutdown()
    assert got.stats.cached_prompt_tokens == len(longer) + len(first.token_ids) - 1
    assert got.token_ids == generate(tiny, follow, params=T1, max_new_tokens=12, seed=3).token_ids


@pytest.mark.parametrize("corrupt", [False, True])
def test_gap_in_seq_ids_is_closed_without_changing_texts(tiny, monkeypatch, corrupt):
    """Under llama.cpp's split a gap in the seq_ids costs a forward per step: with nobody
    waiting, the sequence on the highest seq_id moves into the gap (`BatchWorker._compact`). The
    moved and the unmoved request still get the texts of fresh decoding, greedy and seeded.
    Negative control: a move that copies one position too few changes the moved text."""
    from hierspec.engine import generate

    if corrupt:
        real = ModelSequences.restore
        monkeypatch.setattr(ModelSequences, "restore", lambda self, seq, st, n: real(self, seq, st, n - 1))
    greedy = SamplingParams(temperature=0)
    other = [2, 3, 2, 3, 5, 4]
    for params in (greedy, T1):
        w = worker_on(tiny, num_seqs=3)
        w.split = True  # as on llama.cpp (ModelSequences has no split of its own)
        sink = Collector(3)
        try:  # seq_ids 0, 1, 2 in order; the short one on 1 leaves the gap
            w.submit(GenRequest("long0", list(PROMPT), params, 40, seed=1), sink)
            w.submit(GenRequest("short", [4, 4, 5], params, 2, seed=2), sink)
            w.submit(GenRequest("long2", other, params, 40, seed=3), sink)
            done = sink.wait()
        finally:
            w.shutdown()
        refs = {
            "long0": generate(tiny, PROMPT, params=params, max_new_tokens=40, seed=1).token_ids,
            "long2": generate(tiny, other, params=params, max_new_tokens=40, seed=3).token_ids,
        }
        assert w.moves >= 1
        texts = {k: done[k].token_ids for k in refs}
        if corrupt:
            assert texts["long2"] != refs["long2"]
            return
        assert texts == refs, params
        assert sink.tokens["long2"] == refs["long2"]


def test_sequence_acceptance_follows_the_sequence():
    """A sequence whose drafts keep failing where the shared calibration expects them to pass
    stops looking worth drafting after a few rejections; one that fares as predicted keeps the
    shared estimate; old evidence decays."""
    from hierspec.acceptance import AcceptanceModel, SequenceAcceptance

    shared = AcceptanceModel()
    for _ in range(50):  # the drafter is usually right at confidence 0.85
        shared.update([0.85, 0.85], 2)
    a = shared.estimate(0.85)
    assert a > 0.9
    stuck, fine = SequenceAcceptance(shared), SequenceAcceptance(shared)
    assert stuck.estimate(0.85) == pytest.approx(a)
    for _ in range(3):
        stuck.update([0.85, 0.85, 0.85], 0)
        fine.update([0.85, 0.85], 2)
    assert stuck.estimate(0.85) < 0.5 < fine.estimate(0.85)
    assert fine.estimate(0.85) == pytest.approx(a, rel=0.1)
    for _ in range(40):  # it recovers: the bad streak decays under the cap
        stuck.update([0.85, 0.85], 2)
    assert stuck.estimate(0.85) > 0.8
    assert stuck.expected == pytest.approx(stuck.cap)
    with pytest.raises(ValueError, match="strength"):
        SequenceAcceptance(shared, strength=0)


def test_prefix_store_keeps_the_longest_within_budget():
    from hierspec.serve.prefix import PrefixStore

    store = PrefixStore(budget=10)
    store.put([1, 2, 3], "a", 4)
    store.put([1, 2, 3, 4, 5], "b", 4)  # a is its prefix: dropped
    assert len(store) == 1 and store.used == 4
    store.put([1, 2], "c", 4)  # served by b already
    assert len(store) == 1
    assert store.best([1, 2, 3, 9]) == ((1, 2, 3, 4, 5), "b", 3)
    store.put([7, 8], "d", 4)
    store.put([6], "e", 4)  # over budget: the least recently used (b) goes
    assert store.best([1, 2])[2] == 0 and store.used == 8
    assert store.best([5]) == ((), None, 0)
    store.put([4], "f", 11)  # larger than the budget: not kept
    assert len(store) == 2
    with pytest.raises(ValueError, match="budget"):
        PrefixStore(-1)


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


def test_streams_are_keyed_by_position_however_they_are_read():
    """Generators are seeded when first read after `at` (lazily): the draws of a step depend on
    (seed, stream, position) only, whether or not earlier steps read them, and `at` the same
    position again restarts them."""
    a, b = Streams(7), Streams(7)
    for pos in range(3, 9):
        a.at(pos)
        torch.rand(2, generator=a.draft)  # a reads every step, b only the last
    b.at(8)
    got_b = torch.rand(3, generator=b.verify).tolist()
    assert torch.rand(3, generator=a.verify).tolist() == got_b
    assert torch.rand(3, generator=a.at(8).verify).tolist() == got_b  # re-keyed: the same draws
    assert torch.rand(3, generator=a.at(9).verify).tolist() != got_b
    assert torch.rand(2, generator=Streams(7).at(8).draft).tolist() != got_b[:2]


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


@pytest.mark.smollm
def test_llamacpp_save_restore_moves_cells_between_sequences():
    """A sequence's cells saved to the host and restored into another seq_id (cut to a prefix)
    give that seq_id the logits of the original; a restore cut one position short does not."""
    from hierspec.models.llamacpp import LlamaCppModel
    from hierspec.models.llamacpp_batch import SequenceBatch
    from hierspec.models.open import open_target
    from hierspec.models.sequences import Part

    op = open_target("smollm2-135m", backend="llama.cpp", n_ctx=256)
    op.model.close()
    model = LlamaCppModel(op.path, n_seq_max=3, n_ctx=256)
    try:
        b = SequenceBatch(model)
        ids = list(range(100, 140))
        b.decode([Part(0, ids, False)])
        state, size = b.save(0)
        assert size > 0 and b.length(0) == 40
        b.restore(1, state, 30)
        b.restore(2, state, 29)  # the wrong cut: position 29 is missing
        b.truncate(0, 30)
        assert [b.length(s) for s in range(3)] == [30, 30, 29]
        rows = b.decode([Part(0, ids[30:32]), Part(1, ids[30:32]), Part(2, ids[30:32])])
        torch.testing.assert_close(rows[0], rows[1], atol=1e-3, rtol=1e-3)
        assert (rows[0] - rows[2]).abs().max() > 0.1
        with pytest.raises(ValueError, match="restore"):
            b.restore(1, state, 41)
    finally:
        model.close()
