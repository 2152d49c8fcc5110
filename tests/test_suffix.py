"""Suffix-decoding drafter: proposals on hand-made sequences (repeats, frequency ranking, local vs
global, re-anchoring), the cross-request cache (gain, eviction = rebuild, memory bound), tree
shape, and exactness through the engine (greedy identity for chains and trees, chi² at T > 0 with
a negative control that must fail)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hierspec.drafters import Draft, SuffixDrafter
from hierspec.drafters.base import TreeSpec
from hierspec.drafters.suffix import SuffixIndex
from hierspec.engine import generate
from hierspec.models import make_tiny_pair
from hierspec.sampling import SamplingParams
from hierspec.verify.tree import check_parents
from test_engine import N_CHI2, chi2_p, exact_joint, plain_greedy, sample_counts

GREEDY = SamplingParams(temperature=0)


def propose(d, ctx, k):
    return d.propose(torch.tensor([ctx]), k).tokens[0].tolist()


# ------------------------------------------------------------------- proposals
def test_repeat_detection_and_reanchoring():
    d = SuffixDrafter()
    assert propose(d, [5, 1, 1, 1, 1, 1, 1, 1], 4) == [1, 1, 1, 1]
    assert d.last_match.source == "local" and d.last_match.length == 6
    d.reset()
    # "1 2" continues with 3 4 8 1 2, then the match runs into the end of the context and the
    # walk re-anchors on "... 8 1 2" -> 3: a whole period is drafted.
    assert propose(d, [7, 1, 2, 3, 4, 8, 1, 2], 6) == [3, 4, 8, 1, 2, 3]
    assert propose(d, [7, 1, 2, 3, 4, 8, 1, 2], 0) == []
    d.reset()
    assert propose(d, [1, 2, 3], 4) == []  # nothing repeats, empty cache
    assert propose(d, [1, 2, 3, 9, 9, 1, 2], 2) == [3, 9]  # extension: incremental index
    assert propose(d, [4, 5, 4], 3) == [5, 4, 5]  # not an extension: a new request


def test_frequency_ranking_and_confidence():
    ctx = [0, 1, 2, 7, 0, 1, 2, 7, 0, 1, 2, 7, 0, 1, 2, 8, 0, 1, 2]
    d = SuffixDrafter(min_confidence=0.5)
    draft = d.propose(torch.tensor([ctx]), 3)
    # "0 1 2" -> 7 three times, 8 once (the most recent): frequency wins; then "7" -> "0" always.
    assert draft.tokens[0].tolist() == [7, 0, 1]
    assert d.last_match.length == 3 and d.last_match.occurrences == 4
    torch.testing.assert_close(draft.confidence, torch.tensor([0.75, 1.0, 1.0]))
    assert draft.probs is None  # deterministic
    # Below the confidence threshold nothing is drafted.
    d = SuffixDrafter(min_confidence=0.8)
    assert propose(d, ctx, 3) == []
    # A tie is broken by recency.
    assert propose(SuffixDrafter(), [1, 2, 5, 1, 2, 6, 1, 2], 1) == [6]


def test_local_preferred_on_equal_match_longer_global_wins():
    d = SuffixDrafter()
    d.add_to_cache([1, 2, 3, 9])
    ctx = [4, 1, 2, 3, 5, 6, 1, 2, 3]
    assert propose(d, ctx, 1) == [5] and d.last_match.source == "local"  # both match "1 2 3"
    d.add_to_cache([6, 1, 2, 3, 9])
    assert propose(d, ctx, 1) == [9] and d.last_match.source == "global"  # "6 1 2 3" is longer
    assert d.last_match.length == 4


def test_reset_caches_outputs_and_clear_cache():
    d = SuffixDrafter()
    propose(d, [3, 4], 2)
    propose(d, [3, 4, 10, 11, 12, 13], 2)  # prompt [3, 4], generated 10..13
    d.reset()
    assert d.cached_tokens == 4  # outputs only (cache_prompts=False)
    assert propose(d, [8, 10, 11], 3) == [12, 13]
    d.reset()  # that request generated nothing: nothing added
    assert d.cached_tokens == 4
    d.clear_cache()
    assert d.cached_tokens == 0 and propose(d, [8, 10, 11], 3) == []
    p = SuffixDrafter(cache_prompts=True)
    propose(p, [3, 4, 5], 1)
    p.reset()
    assert p.cached_tokens == 3


# ------------------------------------------------------------------- index, eviction, memory bound
def naive_counts(requests, pattern):
    """{next token: count} over all occurrences of pattern followed by a token of the same request."""
    out: dict[int, int] = {}
    n = len(pattern)
    for r in requests:
        for i in range(len(r) - n):
            if r[i : i + n] == pattern:
                out[r[i + n]] = out.get(r[i + n], 0) + 1
    return out


def test_eviction_counts_equal_a_rebuild_from_the_retained_requests():
    rng = random.Random(0)
    bound = 120
    d = SuffixDrafter(max_pattern=4, max_cached_tokens=bound)
    requests = []
    for _ in range(30):
        base = [rng.randrange(4) for _ in range(rng.randrange(3, 8))]
        r = (base * 5)[: rng.randrange(5, 40)]  # repetitive, varying lengths
        requests.append(r)
        d.add_to_cache(r)
        # Oldest first: the retained requests are the newest ones that fit.
        kept, total = [], 0
        for q in reversed(requests):
            if total + len(q) > bound:
                break
            kept.insert(0, q)
            total += len(q)
        assert d.cached_tokens == total <= bound
        assert [d.global_index.tokens(i).tolist() for i in range(d.global_index.num_segments)] == kept
    fresh = SuffixIndex(pad=4)
    for r in kept:
        fresh.add(r)
    g = d.global_index
    np.testing.assert_array_equal(g._keys, fresh._keys)
    np.testing.assert_array_equal(g._pos, fresh._pos)
    for n in (1, 2, 3):
        for pattern in ([rng.randrange(4) for _ in range(n)] for _ in range(20)):
            ref = naive_counts(kept, pattern)
            assert g.next_counts(pattern) == ref
            assert g.count(pattern) == sum(ref.values())
    # Eviction also drops the entries: an evicted request's unique token is gone.
    d.add_to_cache([50, 51] * 10)
    d.add_to_cache(list(range(60, 60 + bound)))
    assert d.global_index.count([50]) == 0 and d.cached_tokens == bound


def test_memory_bound_too_small_for_one_request():
    d = SuffixDrafter(max_cached_tokens=5)
    with pytest.raises(ValueError, match="max_cached_tokens: 5 is too small for one request"):
        d.add_to_cache(list(range(6)))
    propose(d, [1, 2, 3, 4, 5, 6, 7], 2)  # the prompt is not cached
    with pytest.raises(ValueError, match="max_cached_tokens"):
        propose(d, [1, 2, 3, 4, 5, 6, 7, *range(10, 16)], 2)
    target, _ = make_tiny_pair(vocab_size=16, seed=1)
    with pytest.raises(ValueError, match="max_cached_tokens"):
        generate(target, [1, 2], drafter=SuffixDrafter(max_cached_tokens=4), params=GREEDY, max_new_tokens=20)
    off = SuffixDrafter(max_cached_tokens=0)  # no cross-request cache: no bound
    propose(off, [1, 2, 3, 4, 5, 6, 7, *range(10, 26)], 2)
    off.reset()
    assert off.cached_tokens == 0


def test_bad_arguments():
    for kw, msg in (
        ({"max_pattern": 0}, "max_pattern: expected an integer >= 1"),
        ({"max_cached_tokens": -1}, "max_cached_tokens: expected an integer >= 0"),
        ({"max_occurrences": 1.5}, "max_occurrences"),
        ({"min_confidence": 1.5}, r"min_confidence: expected a number in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=msg):
            SuffixDrafter(**kw)
    d = SuffixDrafter()
    with pytest.raises(ValueError, match=r"context: expected shape \[1, L\]"):
        d.propose(torch.tensor([1, 2]), 2)
    with pytest.raises(ValueError, match="tokens: expected ids"):
        d.add_to_cache([1, -3])
    with pytest.raises(ValueError, match="tokens: expected a 1-D"):
        d.add_to_cache([[1, 2]])
    with pytest.raises(ValueError, match=r"pattern: expected 1\.\.32"):
        d.global_index.count([])


# ------------------------------------------------------------------- trees
@pytest.mark.parametrize(
    "spec", [TreeSpec(1, 1, 1), TreeSpec(3, 2, 5), TreeSpec(5, 4, 16), TreeSpec(8, 3, 40)]
)
def test_tree_shape(spec):
    rng = random.Random(1)
    d = SuffixDrafter(min_confidence=0.0)
    d.add_to_cache([rng.randrange(5) for _ in range(300)])
    for _ in range(20):
        ctx = [rng.randrange(5) for _ in range(rng.randrange(1, 60))]
        tree = d.propose_tree(torch.tensor([ctx]), spec)
        parents = check_parents(tree.parents, tree.tokens.numel()).tolist()
        assert tree.tokens[0] == ctx[-1] and tree.probs is None
        assert 1 <= tree.num_nodes <= spec.budget  # the cache holds every token
        depth = [0]
        for p in parents[1:]:
            depth.append(depth[p] + 1)
        assert max(depth) <= spec.depth
        for node in range(len(parents)):
            kids = [tree.tokens[i].item() for i, p in enumerate(parents) if p == node]
            assert len(kids) == len(set(kids)) <= spec.topk  # distinct siblings
        d.reset()


def test_tree_with_topk_1_is_the_chain():
    ctx = [1, 2, 7, 0, 1, 2, 7, 0, 1, 2, 8, 0, 3, 1, 2]
    d = SuffixDrafter()
    chain = propose(d, ctx, 4)
    tree = d.propose_tree(torch.tensor([ctx]), TreeSpec(depth=4, topk=1, budget=50))
    assert tree.tokens[1:].tolist() == chain and tree.parents.tolist() == [-1, 0, 1, 2, 3]
    tree = d.propose_tree(torch.tensor([ctx]), TreeSpec(depth=2, topk=3, budget=50))
    # best first by path score: 7 (2/3), 7 -> 0 (2/3), 8 (1/3), 8 -> 0 (1/3)
    assert tree.tokens.tolist() == [2, 7, 0, 8, 0] and tree.parents.tolist() == [-1, 0, 1, 0, 3]
    empty = SuffixDrafter().propose_tree(torch.tensor([[1, 2, 3]]), TreeSpec())
    assert empty.num_nodes == 0 and empty.parents.tolist() == [-1]


# ------------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def pair():
    return make_tiny_pair(vocab_size=32, seed=3, dtype=torch.float64, max_length=256)


@pytest.mark.parametrize(
    "tree", [None, TreeSpec(depth=3, topk=2, budget=5), TreeSpec(depth=5, topk=4, budget=16)]
)
def test_greedy_identity(pair, tree):
    target, _ = pair
    d = SuffixDrafter()
    drafted = 0
    for prompt in ([1, 5, 7, 5, 7, 5, 2, 9], [3], [2, 2, 9, 4, 1, 0, 6, 6, 6]):
        ref = plain_greedy(target, prompt, 40)
        for gamma in (1, 3, 6):
            out = generate(
                target, prompt, drafter=d, gamma=gamma, params=GREEDY, max_new_tokens=40, tree=tree
            )
            assert out.token_ids == ref, (prompt, gamma)
            drafted += out.stats.num_draft_tokens
    assert drafted > 0


def test_cross_request_gain(pair):
    """The same request twice: the second run drafts from the cached first output."""
    target, _ = pair
    d = SuffixDrafter()
    prompt = [4, 8, 15, 16, 23, 42 % 32]
    first = generate(target, prompt, drafter=d, gamma=5, params=GREEDY, max_new_tokens=60)
    second = generate(target, prompt, drafter=d, gamma=5, params=GREEDY, max_new_tokens=60)
    assert second.token_ids == first.token_ids
    assert d.cached_tokens > 0
    s1, s2 = first.stats, second.stats
    assert s2.mean_acceptance_length > s1.mean_acceptance_length
    assert s2.num_target_forwards < s1.num_target_forwards
    assert s2.mean_acceptance_length > 4  # nearly every gamma=5 draft is accepted


@pytest.fixture(scope="module")
def small_pair():
    return make_tiny_pair(vocab_size=5, seed=11, dtype=torch.float64, logit_scale=2.5)


def warm_drafter(cls=SuffixDrafter):
    d = cls(min_confidence=0.0)
    rng = random.Random(2)
    for _ in range(5):
        d.add_to_cache([rng.randrange(5) for _ in range(40)])
    return d


class LyingSuffixDrafter(SuffixDrafter):
    """Negative control: drafts deterministically but reports uniform rows as q (a q the tokens
    were not drawn from)."""

    def propose(self, context, num_tokens, params=None, generator=None):
        draft = super().propose(context, num_tokens, params, generator)
        k = draft.num_tokens
        return Draft(draft.tokens, torch.full((1, k, 5), 0.2, dtype=torch.float64))


@pytest.mark.parametrize("rule", ["token", "block", "hsd"])
def test_engine_exact_chi2(small_pair, rule):
    target, _ = small_pair
    prompt = [1, 3, 1, 3, 1]
    params = SamplingParams(temperature=0.8)
    joint = exact_joint(target, prompt, 3, params)
    counts = sample_counts(target, warm_drafter(), prompt, 3, params, rule, 3, N_CHI2, 4)
    assert chi2_p(counts, joint) > 1e-3


def test_engine_chi2_negative_control(small_pair):
    target, _ = small_pair
    prompt = [1, 3, 1, 3, 1]
    params = SamplingParams(temperature=0.8)
    joint = exact_joint(target, prompt, 3, params)
    counts = sample_counts(target, warm_drafter(LyingSuffixDrafter), prompt, 3, params, "token", 3, N_CHI2, 4)
    assert chi2_p(counts, joint) < 1e-6  # the same test as test_engine_exact_chi2["token"] fails


def test_tree_exact_chi2(small_pair):
    target, _ = small_pair
    prompt = [1, 3, 1, 3, 1]
    params = SamplingParams(temperature=1.0)
    joint = exact_joint(target, prompt, 3, params)
    d = warm_drafter()
    counts = np.zeros((5,) * 3)
    nodes = 0
    for i in range(N_CHI2):
        out = generate(
            target,
            prompt,
            drafter=d,
            params=params,
            max_new_tokens=3,
            seed=500_000 + i,
            tree=TreeSpec(depth=2, topk=2, budget=4),
        )
        counts[tuple(out.token_ids)] += 1
        nodes += out.stats.num_draft_tokens
    assert nodes > N_CHI2  # real trees were verified
    assert chi2_p(counts, joint) > 1e-3
