"""Exactness of tree verification (recursive rejection sampling, `hierspec.verify.tree`).

The exactness statement: the emitted sequence (accepted tokens + next token), extended by sampling
from the target up to a fixed length D + 1 (D = tree depth), has exactly the target's
autoregressive law of length D + 1. Deterministic trees are checked tree by tree; stochastic trees
(children drawn i.i.d. or without replacement from a context-dependent draft) are checked after
mixing the conditional law over *every* possible draw of the children. Negative controls (EAGLE-3H
sibling recursion, no residual update, i.i.d. update on children drawn without replacement) must
fail the same check.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hierspec.verify import block, greedy, token, tree
from hierspec.verify.law import CondTables, output_joint, random_tables
from hierspec.verify.tree import (
    TreeVerifyOutput,
    check_tree,
    children,
    expected_accepted,
    expected_accepted_bound,
    tree_law,
    verify_tree,
    verify_tree_greedy,
)

MODES = ["deterministic", "iid", "without_replacement"]

CHAIN = [-1, 0, 1, 2]
STAR = [-1, 0, 0, 0]
# Depth 3; node 1's children 3 and 4 each add a second token (a sibling path with >= 2 new tokens
# after a partial acceptance, the case EAGLE-3H gets wrong).
UNBALANCED = [-1, 0, 0, 1, 1, 3, 4]
# Zhou notes §4.5: root-to-leaf rows [[r,1,0,2],[r,1,3,2],[r,2,1,0]], V = 4.
EAGLE_PARENTS = [-1, 0, 0, 1, 1, 3, 4, 2, 7]
EAGLE_TOKENS = [0, 1, 2, 0, 3, 2, 2, 1, 0]


# ------------------------------------------------------------------- helpers
def depth(parents):
    d = [0] * len(parents)
    for i in range(1, len(parents)):
        d[i] = d[parents[i]] + 1
    return max(d)


def path_tokens(parents, tokens, i):
    out = []
    while i > 0:
        out.append(tokens[i])
        i = parents[i]
    return tuple(reversed(out))


def rows(parents, tokens, table: CondTables):
    """Row i = table(path to i); zeros where the table is too shallow (draft rows of deep leaves,
    which verification must ignore)."""
    v = table.vocab_size
    out = np.zeros((len(parents), v))
    for i in range(len(parents)):
        s = path_tokens(parents, tokens, i)
        if len(s) < len(table.tables):
            out[i] = table(s)
    return out


def distinct_sibling_tokens(parents, v, rng):
    tok = [0] * len(parents)
    for ks in children(parents):
        for c, x in zip(ks, rng.permutation(v)[: len(ks)], strict=False):
            tok[c] = int(x)
    return tok


def random_tree(n, v, rng, max_kids):
    parents = [-1]
    kids = [0]
    for i in range(1, n):
        pa = int(rng.choice([j for j in range(i) if kids[j] < max_kids]))
        parents.append(pa)
        kids[pa] += 1
        kids.append(0)
    return parents


def extend(law, target: CondTables, length):
    """Pad every emitted sequence with target continuations up to `length`: a [V]*length array."""
    v = target.vocab_size
    out = np.zeros((v,) * length)
    for s, m in law.items():
        assert len(s) <= length
        cont = np.asarray(m)
        for i in range(len(s), length):
            cont = cont[..., None] * target.tables[i][s]
        out[s] += cont
    return out


def deviation(law, target, d):
    assert abs(sum(law.values()) - 1) < 1e-12
    return float(np.abs(extend(law, target, d + 1) - target.joint(d + 1)).max())


def module_law(parents, tokens, p, q, mode):
    return tree_law(
        torch.tensor(parents),
        torch.tensor(tokens),
        torch.from_numpy(p),
        None if q is None else torch.from_numpy(q),
        mode=mode,
    )


def draws(parents, draft: CondTables, mode):
    """Every assignment of child tokens with its drawing probability (i.i.d. or sequentially
    without replacement from the parent's draft row)."""
    v = draft.vocab_size
    kids = children(parents)
    for assign in itertools.product(range(v), repeat=len(parents) - 1):
        tok = (0, *assign)
        w = 1.0
        for node, ks in enumerate(kids):
            if not ks:
                continue
            q = draft(path_tokens(parents, tok, node))
            used, seen = 0.0, set()
            for c in ks:
                x = tok[c]
                if mode == "iid":
                    w *= q[x]
                elif x in seen:
                    w = 0.0
                else:
                    w *= q[x] / (1.0 - used)
                    used += q[x]
                    seen.add(x)
        if w > 0:
            yield tok, w


def mixed_deviation(parents, target, draft, mode, law_fn):
    """max |P_out - P_target| with the conditional law mixed over all child draws."""
    mixed = defaultdict(float)
    total = 0.0
    for tok, w in draws(parents, draft, mode):
        total += w
        law = law_fn(parents, tok, rows(parents, tok, target), rows(parents, tok, draft), mode)
        for s, m in law.items():
            mixed[s] += w * m
    assert abs(total - 1) < 1e-12
    return deviation(mixed, target, depth(parents))


# ------------------------------------------------------------------- independent reference law
def accept_ref(r, q, x):
    if q is None:
        return min(1.0, r[x])
    return min(1.0, r[x] / q[x]) if q[x] > 0 else 0.0


def _norm(x, fallback):
    s = x.sum()
    return x / s if s > 0 else fallback


def update_onehot(r, q, x):
    res = r.copy()
    res[x] = 0.0
    return _norm(res, r), q


def update_iid(r, q, x):
    return _norm(np.clip(r - q, 0, None), r), q


def update_wor(r, q, x):
    q2 = q.copy()
    q2[x] = 0.0
    return _norm(np.clip(r - q, 0, None), r), _norm(q2, q2)


def update_keep(r, q, x):
    """Negative control (b): keep r after a rejected sibling."""
    return r, q


GOOD_UPDATE = {"deterministic": update_onehot, "iid": update_iid, "without_replacement": update_wor}


def rrs_law_ref(parents, tokens, p, q, update):
    """Straightforward numpy RRS law with a pluggable residual update."""
    kids = children(parents)
    out = defaultdict(float)

    def visit(node, prefix, mass):
        r, qq = p[node], None if q is None else q[node]
        reach = 1.0
        for c in kids[node]:
            x = tokens[c]
            a = accept_ref(r, qq, x)
            if a > 0:
                visit(c, (*prefix, x), mass * reach * a)
            reach *= 1.0 - a
            if reach <= 0:
                return
            r, qq = update(r, qq, x)
        for y in np.flatnonzero(r > 0):
            out[(*prefix, int(y))] += mass * reach * r[y]

    visit(0, (), 1.0)
    return dict(out)


def eagle3h_law(parents, tokens, p, q=None):
    """Negative control (a): EAGLE-3H `evaluate_posterior(hsd=True)` as described in the Zhou
    reference notes §4.5, on a deterministic tree (q one-hot, so the capping is a no-op).

    Rows are the root-to-leaf paths in lexicographic order. A row continuing an accepted prefix u
    with new tokens y_0..y_{m-1} and target rows T_0 (the carried residual, or p) .. T_{m-1} uses
    level weights w_k = P(u) T(y_<k), level stop a_k = w_k (1 - T_k(y_k)) / (1 - w_k T_k(y_k)),
    stop = the last level that does not step back (0 if all do), full acceptance T(y) *without*
    P(u); after a stop at level s the next row sharing the accepted prefix gets the normalised
    residual (T_s with y_s zeroed) and P(u') = w_s. On a chain this is block verification with a
    one-hot draft (lossless); the P(u) mismatch makes sibling rows lossy."""
    kids = children(parents)
    leaves = [i for i in range(1, len(parents)) if not kids[i]]
    paths = sorted(list(path_nodes(parents, leaf)) for leaf in leaves)
    out = defaultdict(float)

    def emit(prefix, row, mass):
        for y in np.flatnonzero(row > 0):
            out[(*prefix, int(y))] += mass * row[y]

    def run(b, n_acc, carried, pu, mass):
        row = paths[b]
        new = row[n_acc:]
        m = len(new)
        y = [tokens[c] for c in new]
        first = carried if carried is not None else p[row[n_acc - 1] if n_acc else 0]
        t_rows = [first] + [p[c] for c in new[:-1]]
        ti = [t_rows[k][y[k]] for k in range(m)]
        w = [pu * math.prod(ti[:k]) for k in range(m)]
        a = [wk * (1 - tk) / (1 - wk * tk) if 1 - wk * tk > 0 else 0.0 for wk, tk in zip(w, ti, strict=True)]
        sb = [0.0 if wk >= 1 else 1 - ak for wk, ak in zip(w, a, strict=True)]
        full = min(1.0, math.prod(ti))
        acc_prefix = tuple(tokens[c] for c in row[:n_acc])
        if full > 0:
            emit(acc_prefix + tuple(y), p[row[-1]], mass * full)
        for s in range(m):
            ps = math.prod(sb[1:]) if s == 0 else (1 - sb[s]) * math.prod(sb[s + 1 :])
            mm = mass * (1 - full) * ps
            if mm <= 0:
                continue
            resid = t_rows[s].copy()
            resid[y[s]] = 0.0
            resid = _norm(resid, resid)
            n_new = n_acc + s
            nb = next(
                (b2 for b2 in range(b + 1, len(paths)) if paths[b2][:n_new] == row[:n_new]),
                None,
            )
            if nb is None:
                emit(acc_prefix + tuple(y[:s]), resid, mm)
            else:
                run(nb, n_new, resid, w[s], mm)

    run(0, 0, None, 1.0, 1.0)
    return dict(out)


def path_nodes(parents, i):
    out = []
    while i > 0:
        out.append(i)
        i = parents[i]
    return tuple(reversed(out))


# ------------------------------------------------------------------- 1. exact, deterministic trees
DET_CASES = [
    (shape, v, seed)
    for shape in ("chain", "star", "unbalanced", "eagle", "duplicate")
    for v in (3, 4)
    for seed in (0, 1)
    if not (shape == "eagle" and v == 3)
]


def det_instance(shape, v, seed):
    rng = np.random.default_rng(100 * v + seed)
    if shape == "eagle":
        parents, tok = EAGLE_PARENTS, EAGLE_TOKENS
    elif shape == "duplicate":  # a repeated sibling token (never accepted) below an accepted node
        parents = UNBALANCED
        tok = distinct_sibling_tokens(parents, v, rng)
        tok[4] = tok[3]
    else:
        parents = {"chain": CHAIN, "star": STAR, "unbalanced": UNBALANCED}[shape]
        tok = distinct_sibling_tokens(parents, v, rng)
    target = random_tables(v, depth(parents) + 1, rng)
    return parents, tok, target


@pytest.mark.parametrize("shape,v,seed", DET_CASES)
def test_exact_deterministic_tree(shape, v, seed):
    parents, tok, target = det_instance(shape, v, seed)
    p = rows(parents, tok, target)
    law = module_law(parents, tok, p, None, "deterministic")
    assert deviation(law, target, depth(parents)) < 1e-12
    ref = rrs_law_ref(parents, tok, p, None, update_onehot)
    assert set(law) == set(ref)
    assert max(abs(law[s] - ref[s]) for s in law) < 1e-12


# ------------------------------------------------------------------- 2. exact, stochastic trees
STOCH_CASES = [
    (mode, shape, v, seed)
    for mode in ("iid", "without_replacement")
    for shape, v in (("chain", 3), ("star", 3), ("star", 4), ("unbalanced", 3))
    for seed in (0, 1)
]


def stoch_instance(shape, v, seed):
    parents = {"chain": CHAIN, "star": STAR, "unbalanced": UNBALANCED}[shape]
    rng = np.random.default_rng(1000 + 100 * v + seed)
    d = depth(parents)
    return parents, random_tables(v, d + 1, rng), random_tables(v, d, rng)


@pytest.mark.parametrize("mode,shape,v,seed", STOCH_CASES)
def test_exact_stochastic_tree_over_all_draws(mode, shape, v, seed):
    parents, target, draft = stoch_instance(shape, v, seed)
    assert mixed_deviation(parents, target, draft, mode, module_law) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_module_law_equals_reference_law(mode):
    rng = np.random.default_rng(5)
    for _ in range(20):
        v = 4
        parents = random_tree(int(rng.integers(2, 10)), v, rng, max_kids=v)
        tok = distinct_sibling_tokens(parents, v, rng)
        if mode == "iid" and len(parents) > 2:
            tok[-1] = tok[next(c for c in children(parents)[parents[-1]])]  # maybe a repeat
        p = rng.dirichlet(np.full(v, 0.7), size=len(parents))
        q = None if mode == "deterministic" else rng.dirichlet(np.full(v, 0.7), size=len(parents))
        law = module_law(parents, tok, p, q, mode)
        ref = rrs_law_ref(parents, tok, p, q, GOOD_UPDATE[mode])
        assert max(abs(law.get(s, 0.0) - ref.get(s, 0.0)) for s in set(law) | set(ref)) < 1e-12
        e_law = sum((len(s) - 1) * m for s, m in law.items())
        args = (torch.tensor(parents), torch.tensor(tok), torch.from_numpy(p))
        e = expected_accepted(*args, None if q is None else torch.from_numpy(q), mode=mode)
        assert e == pytest.approx(e_law, abs=1e-12)


def _chi2_pvalue(counts: Counter, law: dict, n: int, min_expected=5.0) -> float:
    assert all(law.get(s, 0.0) > 0 for s in counts), "sampled an outcome of probability 0"
    cells = sorted(law)
    exp = np.array([law[s] * n for s in cells])
    obs = np.array([counts.get(s, 0) for s in cells], dtype=float)
    small = exp < min_expected
    exp = np.append(exp[~small], exp[small].sum())
    obs = np.append(obs[~small], obs[small].sum())
    keep = exp > 0
    return float(chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


def mc_instance(mode, seed=3, v=4):
    """UNBALANCED tree; stochastic children drawn from q as the mode says."""
    rng = np.random.default_rng(seed)
    parents = UNBALANCED
    n = len(parents)
    p = rng.dirichlet(np.full(v, 0.8), size=n)
    q = rng.dirichlet(np.full(v, 0.8), size=n)
    tok = [0] * n
    for node, ks in enumerate(children(parents)):
        if mode == "iid":
            xs = rng.choice(v, size=len(ks), p=q[node])
        else:
            xs = rng.choice(v, size=len(ks), p=q[node], replace=False)
        for c, x in zip(ks, xs, strict=True):
            tok[c] = int(x)
    args = (torch.tensor(parents), torch.tensor(tok), torch.from_numpy(p))
    return args, None if mode == "deterministic" else torch.from_numpy(q)


@pytest.mark.parametrize("mode", MODES)
def test_sampler_matches_law_chi2_and_mean_length(mode):
    args, q = mc_instance(mode)
    before = [a.clone() for a in args]
    law = tree_law(*args, q, mode=mode)
    e = expected_accepted(*args, q, mode=mode)
    n = 20_000
    g = torch.Generator().manual_seed(17)
    counts: Counter = Counter()
    lengths = np.empty(n)
    tok, pa = args[1].tolist(), args[0].tolist()
    for i in range(n):
        out = verify_tree(*args, q, mode=mode, generator=g)
        assert isinstance(out, TreeVerifyOutput)
        assert all(pa[b] == a for a, b in itertools.pairwise([0, *out.path]))
        counts[(*(tok[j] for j in out.path), out.next_token)] += 1
        lengths[i] = len(out.path)
    assert _chi2_pvalue(counts, law, n) > 1e-3
    se = lengths.std() / math.sqrt(n)
    assert abs(lengths.mean() - e) < 5 * se + 1e-9
    if mode == "deterministic":
        assert e == pytest.approx(expected_accepted_bound(*args), abs=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(args, before, strict=True))


def test_chi2_negative_control():
    """The chi² check has power: samples of the iid law scored against the deterministic law."""
    args, q = mc_instance("iid")
    law = tree_law(*args, mode="deterministic")
    g = torch.Generator().manual_seed(1)
    tok = args[1].tolist()
    counts: Counter = Counter()
    for _ in range(5000):
        out = verify_tree(*args, q, mode="iid", generator=g)
        counts[(*(tok[j] for j in out.path), out.next_token)] += 1
    counts = Counter({s: c for s, c in counts.items() if law.get(s, 0) > 0})
    assert _chi2_pvalue(counts, law, sum(counts.values())) < 1e-6


# ------------------------------------------------------------------- 3. the deterministic bound
def test_deterministic_trees_reach_the_bound():
    rng = np.random.default_rng(11)
    for _ in range(40):
        v = int(rng.integers(2, 8))
        parents = random_tree(int(rng.integers(1, 16)), v, rng, max_kids=v)
        tok = distinct_sibling_tokens(parents, v, rng)
        p = torch.from_numpy(rng.dirichlet(np.full(v, 0.5), size=len(parents)))
        args = (torch.tensor(parents), torch.tensor(tok), p)
        assert expected_accepted(*args) == pytest.approx(expected_accepted_bound(*args), abs=1e-12)


def test_duplicate_sibling_never_accepted_and_below_bound():
    parents, tok, target = det_instance("duplicate", 4, 0)
    p = torch.from_numpy(rows(parents, tok, target))
    args = (torch.tensor(parents), torch.tensor(tok), p)
    e, bound = expected_accepted(*args), expected_accepted_bound(*args)
    # Node 4 repeats node 3's token: it and its child 6 are never accepted.
    joint = {1: float(p[0, tok[1]]), 2: float(p[0, tok[2]])}
    joint[3] = joint[1] * float(p[1, tok[3]])
    joint[5] = joint[3] * float(p[3, tok[5]])
    assert e == pytest.approx(sum(joint.values()), abs=1e-12)
    assert e < bound - 1e-3
    g = torch.Generator().manual_seed(0)
    assert all(4 not in verify_tree(*args, generator=g).path for _ in range(2000))


# ------------------------------------------------------------------- chains: RRS = token-wise
@pytest.mark.parametrize("deterministic", [False, True])
def test_chain_is_tokenwise_and_block_beats_it(deterministic):
    """On a chain, iid RRS is token-wise speculative sampling (so RRS is not optimal for
    stochastic trees: block verification accepts more in expectation)."""
    rng = np.random.default_rng(4)
    k, v = 3, 4
    parents = torch.tensor([-1, 0, 1, 2])
    for _ in range(10):
        p = torch.from_numpy(rng.dirichlet(np.ones(v), size=k + 1))
        q = torch.from_numpy(rng.dirichlet(np.ones(v), size=k))
        x = torch.tensor([int(rng.choice(v, p=q[t].numpy())) for t in range(k)])
        q_rows = None if deterministic else torch.cat([q, torch.full((1, v), 1.0 / v, dtype=q.dtype)])
        law = tree_law(
            parents,
            torch.cat([torch.tensor([0]), x]),
            p,
            q_rows,
            mode="deterministic" if deterministic else "iid",
        )
        ref = token.law(x, None if deterministic else q, p)
        for j in range(k + 1):
            for y in range(v):
                assert law.get((*x[:j].tolist(), y), 0.0) == pytest.approx(float(ref[j, y]), abs=1e-12)
    target, draft = random_tables(v, k + 1, rng), random_tables(v, k, rng)
    e_tok = output_joint(token.law, target, draft, k).expected_accepted
    e_blk = output_joint(block.law, target, draft, k).expected_accepted
    assert e_blk > e_tok + 1e-3


# ------------------------------------------------------------------- 4. greedy
def greedy_ref(parents, tokens, logits):
    """Brute force: the deepest node whose every path node's token is its parent's row argmax
    (the first index among ties, as plain greedy decoding) and is the first such child."""
    s = logits.numpy()
    kids = children(parents)
    ok = [True] + [False] * (len(parents) - 1)
    for i in range(1, len(parents)):
        pa = parents[i]
        hits = [c for c in kids[pa] if tokens[c] == s[pa].argmax()]
        ok[i] = ok[pa] and bool(hits) and hits[0] == i
    best = max((i for i in range(len(parents)) if ok[i]), key=lambda i: len(path_nodes(parents, i)))
    return list(path_nodes(parents, best)), int(s[best].argmax())


def test_greedy_tree_matches_brute_force_and_chain_rule():
    rng = np.random.default_rng(8)
    deep = 0
    for trial in range(300):
        v = int(rng.integers(2, 5))
        parents = random_tree(int(rng.integers(1, 14)), v, rng, max_kids=v + 1)
        tok = [int(t) for t in rng.integers(0, v, size=len(parents))]  # duplicates allowed
        logits = torch.randn(
            len(parents), v, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        )
        if trial % 2:  # exact ties at the maximum: plain greedy takes the lowest index
            logits = logits.round()
        out = verify_tree_greedy(torch.tensor(parents), torch.tensor(tok), logits, validate=True)
        path, nxt = greedy_ref(parents, tok, logits)
        assert out.path == path and out.next_token == nxt
        deep = max(deep, len(path))
    assert deep >= 3
    # On a chain the tree rule is the chain rule.
    k, v = 4, 3
    for seed in range(20):
        logits = torch.randn(k + 1, v, generator=torch.Generator().manual_seed(seed))
        x = logits[:k].argmax(-1)
        x[seed % k] = (x[seed % k] + seed % 2) % v
        out = verify_tree_greedy(torch.arange(-1, k), torch.cat([torch.tensor([0]), x]), logits)
        ref = greedy.rule(x[None], None, logits[None])
        assert len(out.path) == int(ref.num_accepted) and out.next_token == int(ref.next_token)


# ------------------------------------------------------------------- 5. negative controls
def test_eagle3h_control_exact_on_chain():
    """Sanity of the control's model: on a single chain it is block verification (lossless)."""
    for v, seed in ((3, 0), (4, 1)):
        parents, tok, target = det_instance("chain", v, seed)
        p = rows(parents, tok, target)
        assert deviation(eagle3h_law(parents, tok, p), target, depth(parents)) < 1e-12


def test_eagle3h_sibling_recursion_is_lossy():
    worst = 0.0
    for seed in range(2):
        parents, tok, target = det_instance("eagle", 4, seed)
        p = rows(parents, tok, target)
        worst = max(worst, deviation(eagle3h_law(parents, tok, p), target, depth(parents)))
    assert worst > 1e-3, worst


def test_no_residual_update_is_lossy():
    worst = 0.0
    for shape, v, seed in DET_CASES:
        if shape in ("star", "unbalanced"):
            parents, tok, target = det_instance(shape, v, seed)
            p = rows(parents, tok, target)
            worst = max(
                worst, deviation(rrs_law_ref(parents, tok, p, None, update_keep), target, depth(parents))
            )
    assert worst > 1e-2, worst
    parents, target, draft = stoch_instance("star", 3, 0)
    keep = lambda pa, tok, p, q, mode: rrs_law_ref(pa, tok, p, q, update_keep)  # noqa: E731
    assert mixed_deviation(parents, target, draft, "iid", keep) > 1e-2


def test_iid_update_without_replacement_is_lossy():
    worst = 0.0
    iid_update = lambda pa, tok, p, q, mode: rrs_law_ref(pa, tok, p, q, update_iid)  # noqa: E731
    good = lambda pa, tok, p, q, mode: rrs_law_ref(pa, tok, p, q, update_wor)  # noqa: E731
    for shape, v in (("star", 3), ("star", 4)):
        parents, target, draft = stoch_instance(shape, v, 0)
        assert mixed_deviation(parents, target, draft, "without_replacement", good) < 1e-12
        worst = max(worst, mixed_deviation(parents, target, draft, "without_replacement", iid_update))
    assert worst > 1e-3, worst


# ------------------------------------------------------------------- 6. bad input
def _good():
    parents = torch.tensor([-1, 0, 0, 1])
    tokens = torch.tensor([5, 1, 2, 0])
    p = torch.full((4, 3), 1 / 3, dtype=torch.float64)
    q = p.clone()
    q[3] = 0.0  # a leaf's draft row is unused
    return {"parents": parents, "tokens": tokens, "target_probs": p, "draft_probs": q, "mode": "iid"}


def _set(key, value):
    def f(kw):
        kw[key] = value(kw) if callable(value) else value

    return f


def _row_off(key, i):
    def f(kw):
        x = kw[key].clone()
        x[i, 0] += 0.1
        kw[key] = x

    return f


def _zero_q_at_child(kw):
    q = kw["draft_probs"].clone()
    q[0] = torch.tensor([0.0, 0.5, 0.5])
    kw["tokens"] = torch.tensor([5, 0, 2, 0])
    kw["draft_probs"] = q


BAD = [
    (_set("parents", torch.tensor([0, 0, 0, 1])), "parents"),
    (_set("parents", torch.tensor([-1, 0, 2, 1])), "parents"),
    (_set("parents", torch.tensor([-1, 0, 0, 3])), "parents"),
    (_set("parents", torch.tensor([-1.0, 0, 0, 1])), "parents"),
    (_set("parents", torch.tensor([[-1, 0, 0, 1]])), "parents"),
    (_set("tokens", torch.tensor([5, 1, 2])), "tokens"),
    (_set("tokens", torch.tensor([5, 1, 3, 0])), "tokens"),
    (_set("target_probs", lambda kw: kw["target_probs"][:3]), "target_probs"),
    (_set("target_probs", lambda kw: kw["target_probs"].float().log()), "target_probs"),
    (_row_off("target_probs", 2), "target_probs"),
    (_set("draft_probs", lambda kw: kw["draft_probs"][:, :2]), "draft_probs"),
    (_row_off("draft_probs", 1), "draft_probs"),
    (_zero_q_at_child, "draft_probs"),
    (_set("draft_probs", None), "draft_probs"),
    (_set("mode", "deterministic"), "draft_probs"),
    (_set("mode", "topk"), "mode"),
    (lambda kw: kw.update(mode="without_replacement", tokens=torch.tensor([5, 1, 1, 0])), "tokens"),
]


@pytest.mark.parametrize("mutate,arg", BAD)
def test_bad_input(mutate, arg):
    kw = _good()
    tree_law(**kw)  # the good instance passes (including the zero leaf draft row)
    verify_tree(**kw, validate=True)
    mutate(kw)
    with pytest.raises(ValueError, match=rf"^{arg}: expected"):
        verify_tree(**kw, validate=True)
    with pytest.raises(ValueError, match=rf"^{arg}: expected"):
        tree_law(**kw)


def test_bad_input_other_entry_points():
    kw = _good()
    check_tree(kw["parents"], kw["tokens"])
    with pytest.raises(ValueError, match=r"^target_probs: expected"):
        expected_accepted_bound(kw["parents"], kw["tokens"], kw["target_probs"][:, :2] * 2)
    logits = torch.randn(4, 3)
    logits[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^target_logits: expected"):
        verify_tree_greedy(kw["parents"], kw["tokens"], logits, validate=True)
    with pytest.raises(ValueError, match=r"^parents: expected"):
        verify_tree_greedy(torch.tensor([-1, 1, 0, 1]), kw["tokens"], torch.randn(4, 3), validate=True)


def test_single_node_tree_and_verify_module_export():
    import hierspec.verify as verify

    assert verify.tree is tree and "tree" in verify.__all__ and "tree" not in verify.RULES
    p = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    root = (torch.tensor([-1]), torch.tensor([7]), p)
    assert tree_law(*root) == {(0,): 0.25, (1,): 0.75}
    assert expected_accepted(*root) == 0.0 == expected_accepted_bound(*root)
    out = verify_tree(*root, generator=torch.Generator().manual_seed(0))
    assert out.path == [] and out.next_token in (0, 1)
    assert verify_tree_greedy(*root) == TreeVerifyOutput(path=[], next_token=1)
